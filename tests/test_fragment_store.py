"""Fragment KV through real tiers under position-independent keys: exact round trips, sharing
through a disk folder and through S3 (SeaweedFS on loopback), misfit objects are misses."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from sgl_kvext.blend.prefill import ChunkKV
from sgl_kvext.fragments.store import FragmentStore, KVLayout
from sgl_kvext.harness.seaweedfs import SeaweedFS
from sgl_kvext.pages.keys import DEFAULT_TENANT as T0
from sgl_kvext.pages.keys import ModelIdentity, Namespace, Tenant, fragment_key, page_keys
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.disk import DiskTier
from sgl_kvext.tiers.host import HostTier
from sgl_kvext.tiers.objects import KVPage
from sgl_kvext.tiers.s3 import S3Tier

IDENTITY = ModelIdentity("cfg", "weights", "bfloat16", 16, "mha:layers=3,kv_heads=2,head_dim=8")
LAYOUT = KVLayout(layers=3, kv_heads=2, head_dim=8, dtype=torch.bfloat16)
NS = Namespace(IDENTITY).model_digest


def chunk(n: int, seed: int, dtype: torch.dtype = torch.bfloat16) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50_000, (n,), generator=g)
    k = torch.randn(3, n, 2, 8, generator=g).to(dtype)
    v = torch.randn(3, n, 2, 8, generator=g).to(dtype)
    return ChunkKV(ids, k, v)


def host_store() -> FragmentStore:
    return FragmentStore(TierChain([HostTier(1 << 20)]), IDENTITY, LAYOUT)


def assert_same(a: ChunkKV, b: ChunkKV) -> None:
    assert torch.equal(a.token_ids, b.token_ids)
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    assert a.k.dtype == b.k.dtype


def test_fragment_key_depends_on_tokens_and_namespace_only() -> None:
    ids = np.arange(40)
    ns = Namespace(IDENTITY)
    assert fragment_key(ns, ids) == fragment_key(ns, list(range(40)))
    assert fragment_key(ns, ids) != fragment_key(ns, ids[:39])
    tenant_b = Namespace(IDENTITY, Tenant(cache_salt="tenant-b"))
    assert fragment_key(ns, ids) != fragment_key(tenant_b, ids)
    other = ModelIdentity("cfg", "weights-2", "bfloat16", 16, IDENTITY.kv_layout)
    assert fragment_key(ns, ids) != fragment_key(Namespace(other), ids)
    assert fragment_key(ns, ids[:16]) not in page_keys(ns, ids[:16])
    with pytest.raises(ValueError, match="at least one token"):
        fragment_key(ns, [])


def test_round_trip_is_exact_and_position_free() -> None:
    store = host_store()
    a, b = chunk(37, 0), chunk(5, 1)
    assert store.put(T0, a) == store.key(T0, a.token_ids)
    store.put(T0, b)
    found = store.get(T0, [b.token_ids, chunk(9, 2).token_ids, a.token_ids])
    assert sorted(found) == [0, 2]
    assert_same(found[0], b)
    assert_same(found[2], a)
    assert store.counters["hits"] == 2 and store.counters["misses"] == 1


def test_tenants_do_not_share_fragments() -> None:
    store = host_store()
    a = chunk(12, 3)
    store.put("tenant-a", a)
    assert store.get("tenant-b", [a.token_ids]) == {}
    assert 0 in store.get("tenant-a", [a.token_ids])


def test_put_refuses_kv_that_does_not_fit_the_model() -> None:
    store = host_store()
    with pytest.raises(ValueError, match="needs"):
        store.put(T0, chunk(4, 0, torch.float32))
    bad = chunk(4, 0)
    with pytest.raises(ValueError, match="needs"):
        store.put(T0, ChunkKV(bad.token_ids, bad.k[:2], bad.v[:2]))


def test_misfit_object_under_the_key_is_a_miss() -> None:
    chain = TierChain([HostTier(1 << 20)])
    store = FragmentStore(chain, IDENTITY, LAYOUT)
    a = chunk(6, 4)
    wrong = torch.zeros(2, 3, 7, 2, 8, dtype=torch.bfloat16)      # 7 tokens, not 6
    chain.put([KVPage(store.key(T0, a.token_ids), wrong.view(torch.uint8).numpy().data,
                      "bfloat16", tuple(wrong.shape))])
    assert store.get(T0, [a.token_ids]) == {}
    assert store.counters["bad_objects"] == 1


def test_demoted_fragment_survives_a_restart_on_disk(tmp_path: Path) -> None:
    # A host tier too small for two fragments demotes the first to disk.
    first, second = chunk(300, 5), chunk(300, 6)
    # Each is 2*3*300*2*8*2 = 57600 bytes: 15 blocks of 4 KiB; the host holds 16 blocks.
    chain = TierChain([HostTier(16 * 4096, block_bytes=4096),
                       DiskTier(tmp_path, 1 << 24, NS)])
    store = FragmentStore(chain, IDENTITY, LAYOUT)
    store.put(T0, first)
    store.put(T0, second)
    chain.flush(timeout_s=10)
    chain.close()
    # A new process: empty host memory, the same folder.
    chain2 = TierChain([HostTier(1 << 20), DiskTier(tmp_path, 1 << 24, NS)])
    again = FragmentStore(chain2, IDENTITY, LAYOUT).get(T0, [first.token_ids])
    chain2.close()
    assert_same(again[0], first)


def test_second_instance_hits_through_s3(seaweed: SeaweedFS) -> None:
    url = f"s3://kvext-test/{uuid.uuid4().hex}"

    def s3_chain() -> TierChain:
        s3 = S3Tier(url, NS, endpoint=seaweed.endpoint, credentials=seaweed.credentials)
        return TierChain([HostTier(1 << 20), s3], "write_through")

    writer_chain, reader_chain = s3_chain(), s3_chain()
    a = chunk(64, 7)
    FragmentStore(writer_chain, IDENTITY, LAYOUT).put(T0, a)
    writer_chain.flush(timeout_s=30)
    found = FragmentStore(reader_chain, IDENTITY, LAYOUT).get(T0, [a.token_ids])
    writer_chain.close()
    reader_chain.close()
    assert_same(found[0], a)


def test_local_reads_never_touch_lower_tiers_on_the_callers_thread(tmp_path: Path) -> None:
    import threading

    class DiskReadsRecorded(DiskTier):        # the real disk tier; records who reads it
        readers: list[str] = []

        def get(self, keys):  # type: ignore[no-untyped-def]
            self.readers.append(threading.current_thread().name)
            return super().get(keys)

    first, second = chunk(300, 5), chunk(300, 6)
    chain = TierChain([HostTier(16 * 4096, block_bytes=4096),
                       DiskReadsRecorded(tmp_path, 1 << 24, NS)])
    store = FragmentStore(chain, IDENTITY, LAYOUT)
    gone: list[bytes] = []
    store.on_gone = gone.append
    store.put(T0, first)
    store.put(T0, second)                     # the host holds one: the first went to disk
    chain.flush(timeout_s=10)
    assert store.get(T0, [first.token_ids], local_only=True) == {}     # a miss for now ...
    assert store.wait_promotions(30)
    again = store.get(T0, [first.token_ids], local_only=True)          # ... up for the next
    assert_same(again[0], first)
    assert DiskReadsRecorded.readers and threading.current_thread().name not in \
        DiskReadsRecorded.readers
    unknown = chunk(8, 9)
    assert store.get(T0, [unknown.token_ids], local_only=True) == {}
    assert store.wait_promotions(30) and gone == [store.key(T0, unknown.token_ids)]
    store.close()
    chain.close()
