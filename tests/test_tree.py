"""HierarchicalRadixCache on SGLang's real CPU KV pool and allocator, without a server.

Every token's KV is a function of its whole prefix (as real KV is), so a page loaded at the
wrong place, for the wrong tenant or from a different context shows up as a mismatch.
"""

from __future__ import annotations

import hashlib
import types
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import remote_disk_fake
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import (
    EvictParams,
    InitLoadBackParams,
    InsertParams,
    MatchPrefixParams,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.radix_cache import RadixKey

from sgl_kvext.config.settings import KVExtConfig, TierConfig
from sgl_kvext.pages.keys import DEFAULT_TENANT, ModelIdentity
from sgl_kvext.pages.kv_pages import PagedKV
from sgl_kvext.pages.tiering import KVTiering
from sgl_kvext.sglang_plugin.tree import HierarchicalRadixCache
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.disk import DiskTier
from sgl_kvext.tiers.host import HostTier

T, HEADS, DIM, LAYERS = 8, 2, 4, 3


def kv_of(tokens: list[int], salt: str = "") -> torch.Tensor:
    """(2, layers, n, heads, dim): token i's KV depends on tokens[: i + 1] (and the salt)."""
    out = torch.empty((2, LAYERS, len(tokens), HEADS, DIM))
    h = hashlib.blake2b(salt.encode(), digest_size=16)
    for i, tok in enumerate(tokens):
        h.update(tok.to_bytes(4, "little"))
        seed = int.from_bytes(h.copy().digest()[:8], "little")
        out[:, :, i] = torch.randn((2, LAYERS, HEADS, DIM),
                                   generator=torch.Generator().manual_seed(seed))
    return out


class Harness:
    def __init__(self, root: Path, pool_tokens: int = 256, host_pages: int = 64,
                 disk: bool = False, policy: str = "best_effort", remote: bool = False,
                 kv_events: bool = False) -> None:
        self.holds = 0
        self.last_req: Any = None
        self.pool = MHATokenToKVPool(pool_tokens, 1, torch.float32, HEADS, DIM, LAYERS, "cpu",
                                     False)
        self.alloc = TokenToKVPoolAllocator(pool_tokens, torch.float32, "cpu", self.pool, False)
        paged = PagedKV(self.pool.k_buffer, self.pool.v_buffer, T)
        tiers = [HostTier(host_pages * paged.page_nbytes, block_bytes=paged.page_nbytes)]
        if disk:
            tiers.append(DiskTier(root / "disk", 1 << 30, bytes(32)))
        if remote:                  # read only through prefetches into the host tier
            tiers.append(remote_disk_fake(root / "remote", 1 << 30, bytes(32)))
        self.tiering = KVTiering(paged, TierChain(tiers),
                                 ModelIdentity("cfg", "w", "float32", T, "test"),
                                 prefetch_policy=policy)
        params = CacheInitParams(disable=False, req_to_token_pool=None,
                                 token_to_kv_pool_allocator=self.alloc, page_size=1,
                                 enable_kv_cache_events=kv_events)
        config = KVExtConfig(enabled=True, tiers=TierConfig(prefetch_policy=policy))
        self.tree = HierarchicalRadixCache(params, config, self.tiering)
        self.total = self.alloc.available_size()

    def insert(self, tokens: list[int], salt: str | None = None) -> None:
        slots = self.alloc.alloc(len(tokens))
        if slots is None:
            self.tree.evict(EvictParams(num_tokens=len(tokens)))
            slots = self.alloc.alloc(len(tokens))
        kv = kv_of(tokens, salt or "")
        for layer in range(LAYERS):
            self.pool.k_buffer[layer][slots] = kv[0, layer]
            self.pool.v_buffer[layer][slots] = kv[1, layer]
        result = self.tree.insert(InsertParams(key=RadixKey(array("q", tokens), salt),
                                               value=slots))
        self.alloc.free(slots[: result.prefix_len])   # the tree kept its own copy of those

    def fetch(self, tokens: list[int], salt: str | None = None, rid: str = "r") -> int:
        """Admit like SGLang: match, load back; a held request waits and is matched again."""
        req = self.last_req = types.SimpleNamespace(cache_request_handle=rid)
        for _ in range(20):
            m = self.tree.match_prefix(MatchPrefixParams(
                key=RadixKey(array("q", tokens), salt), req=req))
            if m.host_hit_length == 0:
                return m.device_prefix_len
            out = self.tree.init_load_back(InitLoadBackParams(
                best_match_node=m.best_match_node, host_hit_length=m.host_hit_length, req=req))
            if out is not None:
                return m.device_prefix_len + out[0]
            self.holds += 1
            self.tiering.prefetcher.wait(rid, 30)
        raise AssertionError("request held forever")

    def device_kv(self, tokens: list[int], salt: str | None = None) -> torch.Tensor:
        m = self.tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens), salt)))
        slots = self.tree.path_device_indices(m.last_device_node)[: m.device_prefix_len]
        return torch.stack([torch.stack([b[slots] for b in self.pool.k_buffer]),
                            torch.stack([b[slots] for b in self.pool.v_buffer])])

    def check_accounting(self) -> None:
        assert (self.alloc.available_size() + self.tree.evictable_size()
                + self.tree.protected_size()) == self.total

    def close(self) -> None:
        self.tiering.close()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    yield h
    h.close()


def seq(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_evicted_prefix_loads_back_exactly_its_partial_page_too(harness: Harness) -> None:
    a = seq(1000, 50)
    harness.insert(a)
    harness.tree.evict(EvictParams(num_tokens=1000))
    assert harness.alloc.available_size() == harness.total
    assert harness.fetch(a) == 50                     # 6 full pages and the tail of 2
    torch.testing.assert_close(harness.device_kv(a), kv_of(a), rtol=0, atol=0)
    harness.check_accounting()


def test_diverging_prompt_loads_only_shared_pages(harness: Harness) -> None:
    a = seq(1000, 40)
    b = a[:20] + seq(5000, 20)
    harness.insert(a)
    harness.tree.evict(EvictParams(num_tokens=1000))
    assert harness.fetch(b) == 16                     # pages 0, 1; page 2 differs at token 20
    torch.testing.assert_close(harness.device_kv(b), kv_of(b)[:, :, :16], rtol=0, atol=0)


def test_load_continues_a_device_prefix_mid_page(harness: Harness) -> None:
    a = seq(1000, 48)
    harness.insert(a[:12])
    harness.insert(a)                                 # node [0, 12) and child [12, 48)
    harness.tree.evict(EvictParams(num_tokens=36))    # only the child leaves the device
    assert harness.tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", a)))
                                     ).device_prefix_len == 12
    assert harness.fetch(a) == 48                     # page 1 is loaded from token 12 on
    torch.testing.assert_close(harness.device_kv(a), kv_of(a), rtol=0, atol=0)
    harness.check_accounting()
    # the response says where the prompt's cached tokens came from
    assert harness.last_req.customized_info["kvext_load"] == [{"device": 12, "host": 36}]
    harness.fetch(a, rid="again")                     # all on the device now
    assert harness.last_req.customized_info["kvext_load"] == [{"device": 48}]


def test_tenants_do_not_share_pages(harness: Harness) -> None:
    a = seq(1000, 32)
    harness.insert(a, salt="tenant-a")
    harness.tree.evict(EvictParams(num_tokens=1000))
    assert harness.fetch(a, salt="tenant-b") == 0
    assert harness.fetch(a, salt="tenant-a") == 32
    torch.testing.assert_close(harness.device_kv(a, "tenant-a"), kv_of(a, "tenant-a"),
                               rtol=0, atol=0)


def test_missing_page_makes_the_load_recompute(harness: Harness) -> None:
    a = seq(1000, 32)
    harness.insert(a)
    harness.tree.evict(EvictParams(num_tokens=1000))
    req = types.SimpleNamespace(cache_request_handle="x")
    m = harness.tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", a)), req=req))
    assert m.host_hit_length == 32
    keys = harness.tiering.keys_for(DEFAULT_TENANT, a)
    harness.tiering.chain.tiers[0].delete([keys[2]])  # vanishes between match and load
    loaded, node = harness.tree.init_load_back(InitLoadBackParams(
        best_match_node=m.best_match_node, host_hit_length=32, req=req))
    assert loaded == 0 and node is m.best_match_node
    assert harness.alloc.available_size() == harness.total   # the slots went back
    assert harness.tiering.counters["failed_loads"] == 1


def _pushed_below_host(h: Harness) -> list[int]:
    """A 64-token prefix spilled, then pushed out of the 8-page host tier by another one's
    8 pages, down to the lower tier; returns its tokens."""
    a, b = seq(1000, 64), seq(5000, 64)
    for tokens in (a, b):
        h.insert(tokens)
        h.tree.evict(EvictParams(num_tokens=1000))
    h.tiering.chain.flush()
    return a


def test_disk_pages_load_straight_into_the_pool(tmp_path: Path) -> None:
    h = Harness(tmp_path, host_pages=8, disk=True)
    a = _pushed_below_host(h)
    keys = h.tiering.keys_for(DEFAULT_TENANT, a)
    assert h.tiering.chain.lookup(keys).tiers == (1,) * 8
    h.tiering.cost.prefill_tps = 10.0                # recomputing is slow: reading disk pays
    assert h.fetch(a, rid="q1") == 64 and h.holds == 0
    assert h.tiering.counters["streamed_pages"] == 8
    assert h.tiering.chain.lookup(keys).tiers == (1,) * 8     # the host tier was not needed
    torch.testing.assert_close(h.device_kv(a), kv_of(a), rtol=0, atol=0)
    h.check_accounting()
    h.close()


def test_remote_pages_are_prefetched_then_loaded(tmp_path: Path) -> None:
    h = Harness(tmp_path, host_pages=8, remote=True)
    a = _pushed_below_host(h)
    keys = h.tiering.keys_for(DEFAULT_TENANT, a)
    assert h.tiering.chain.lookup(keys).tiers == (1,) * 8
    assert h.fetch(a, rid="q1") == 0                 # not on host: nothing waits, prefetch starts
    assert h.tiering.prefetcher.wait("q1", 30)
    assert h.tiering.chain.lookup(keys).tiers == (0,) * 8
    assert h.fetch(a, rid="q2") == 64
    torch.testing.assert_close(h.device_kv(a), kv_of(a), rtol=0, atol=0)
    h.check_accounting()
    h.close()


@pytest.mark.parametrize("policy", ["timeout", "wait_complete"])
def test_held_request_waits_for_its_prefetch(tmp_path: Path, policy: str) -> None:
    h = Harness(tmp_path, host_pages=8, remote=True, policy=policy)
    a = _pushed_below_host(h)
    h.tiering.cost.prefill_tps = 10.0               # recomputing is slow: waiting pays
    assert h.fetch(a, rid="q") == 64                # held, matched again, then loaded
    assert h.holds >= 1
    torch.testing.assert_close(h.device_kv(a), kv_of(a), rtol=0, atol=0)
    h.check_accounting()
    h.close()


def test_timeout_policy_does_not_wait_when_recompute_is_faster(tmp_path: Path) -> None:
    h = Harness(tmp_path, host_pages=8, remote=True, policy="timeout")
    a = _pushed_below_host(h)
    h.tiering.cost.prefill_tps = 1e12               # recomputing is free: never wait
    assert h.fetch(a, rid="q") == 0 and h.holds == 0
    h.close()


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["insert", "evict", "fetch", "lock", "unlock"]),
                          st.integers(0, 3), st.integers(1, 40), st.integers(0, 200)),
                min_size=1, max_size=25))
def test_random_operations_never_serve_wrong_kv(tmp_path: Path, ops: list) -> None:  # type: ignore[type-arg]
    h = Harness(tmp_path, pool_tokens=128, host_pages=12)
    bases = [seq(1000 * (b + 1), 60) for b in range(4)]
    locked: list[tuple[object, list[int], torch.Tensor]] = []   # (node, tokens, its KV)
    try:
        for op, base, length, amount in ops:
            tokens = bases[base][:length]
            if op == "insert":
                if h.alloc.available_size() + h.tree.evictable_size() >= length:
                    h.insert(tokens)
            elif op == "evict":
                h.tree.evict(EvictParams(num_tokens=amount))
            elif op == "fetch":
                got = h.fetch(tokens)
                assert got <= length
                torch.testing.assert_close(h.device_kv(tokens), kv_of(tokens)[:, :, :got],
                                           rtol=0, atol=0)
            elif op == "lock":
                m = h.tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens))))
                if m.device_prefix_len:
                    h.tree.inc_lock_ref(m.last_device_node)
                    locked.append((m.last_device_node, tokens[:m.device_prefix_len],
                                   h.device_kv(tokens[:m.device_prefix_len])))
            elif locked:
                node, _, _ = locked.pop(amount % len(locked))
                h.tree.dec_lock_ref(node)
            for _, held, kv in locked:       # a locked prefix never leaves the device
                torch.testing.assert_close(h.device_kv(held), kv, rtol=0, atol=0)
            h.check_accounting()
    finally:
        for node, _, _ in locked:
            h.tree.dec_lock_ref(node)
        h.close()


def test_spill_and_load_back_make_no_tensor_on_the_default_device(
        harness: Harness, meta_default_device: None) -> None:
    """The tree's paths (insert, evict and spill, match, hold, load back) with torch's default
    device ``meta``: a tensor made without the pool's device would fail here (CUDA readiness,
    see tests/test_device_placement.py)."""
    a, b = seq(1000, 50), seq(1000, 30) + seq(5000, 20)
    with torch.device("cpu"):        # the test's stand-in for a forward pass writing KV
        harness.insert(a)
        harness.insert(b)
    harness.tree.evict(EvictParams(num_tokens=1000))
    assert harness.fetch(a) == 50 and harness.fetch(b) == 50
    got = harness.device_kv(b)
    with torch.device("cpu"):        # the test's own reference KV
        torch.testing.assert_close(got, kv_of(b), rtol=0, atol=0)
    harness.check_accounting()
