"""KVTiering loads through a bounded staging buffer: batches of pages, exact KV, misses."""

import pytest
import torch

from sgl_kvext.pages import tiering as kv_tiering
from sgl_kvext.pages.keys import ModelIdentity
from sgl_kvext.pages.kv_pages import PagedKV
from sgl_kvext.pages.tiering import KVTiering
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.host import HostTier

T, LAYERS, HEADS, DIM, SLOTS = 4, 2, 2, 4, 256
IDENTITY = ModelIdentity("cfg", "weights", "float32", T, "mha:layers=2,kv_heads=2,head_dim=4")


@pytest.fixture
def tiering(monkeypatch):
    monkeypatch.setattr(kv_tiering, "_STAGING_BYTES", 3 * 2 * LAYERS * T * HEADS * DIM * 4 + 1)
    gen = torch.Generator().manual_seed(0)
    k = [torch.randn(SLOTS, HEADS, DIM, generator=gen) for _ in range(LAYERS)]
    v = [torch.randn(SLOTS, HEADS, DIM, generator=gen) for _ in range(LAYERS)]
    t = KVTiering(PagedKV(k, v, T), TierChain([HostTier(1 << 20, block_bytes=1024)]), IDENTITY,
                  prefetch_threads=1)
    yield t
    t.close()


def _kv(t, slots):
    return torch.stack([torch.stack([buf[slots] for buf in side]) for side in (t.pool.k,
                                                                             t.pool.v)])


@pytest.mark.parametrize("device_len", [0, 6, 12, 33])
def test_a_load_larger_than_the_staging_buffer_is_exact(tiering, device_len):
    tokens = list(range(1000, 1040))                      # 10 pages, 4 batches of <= 3
    tiering.spill("", tokens, torch.arange(40), 0)
    plan = tiering.plan("", tokens, device_len)
    assert (plan.start, plan.end) == (device_len, 40)
    dst = torch.arange(100, 100 + plan.tokens)
    assert tiering.load(plan, dst)
    assert torch.equal(_kv(tiering, dst), _kv(tiering, torch.arange(device_len, 40)))
    assert tiering._staging.shape[0] == 3                 # never grows with the load
    assert tiering.counters["loaded_pages"] == len(plan.keys)


def test_a_page_missing_in_a_later_batch_is_a_miss(tiering):
    tokens = list(range(2000, 2040))
    tiering.spill("", tokens, torch.arange(40), 0)
    plan = tiering.plan("", tokens, 0)
    tiering.chain.tiers[0].delete([plan.keys[7]])         # third batch
    assert not tiering.load(plan, torch.arange(100, 140))
    assert tiering.counters == {"spilled_pages": 10, "loaded_pages": 0, "failed_loads": 1}


def _tiering_over(chain):
    gen = torch.Generator().manual_seed(1)
    k = [torch.randn(SLOTS, HEADS, DIM, generator=gen) for _ in range(LAYERS)]
    v = [torch.randn(SLOTS, HEADS, DIM, generator=gen) for _ in range(LAYERS)]
    return KVTiering(PagedKV(k, v, T), chain, IDENTITY, prefetch_threads=1)


def test_a_page_the_chain_dropped_is_spilled_again():
    tiering = _tiering_over(TierChain([HostTier(4 * 1024, block_bytes=1024)]))  # 4 pages
    first = list(range(3000, 3008))                          # 2 pages
    assert tiering.spill("", first, torch.arange(8), 0) == 2
    assert tiering.spill("", first, torch.arange(8), 0) == 0  # stored: skipped
    assert tiering.spill("", list(range(4000, 4016)), torch.arange(16, 32), 0) == 4
    assert not any(tiering.chain.tiers[0].exists(tiering.keys_for("", first)))  # evicted
    assert tiering.spill("", first, torch.arange(8), 0) == 2  # so stored again
    plan = tiering.plan("", first, 0)
    assert plan is not None and tiering.load(plan, torch.arange(100, 108))
    assert torch.equal(_kv(tiering, torch.arange(100, 108)), _kv(tiering, torch.arange(8)))
    tiering.close()


def test_a_page_found_missing_on_load_is_spilled_again(tiering):
    tokens = list(range(5000, 5040))
    tiering.spill("", tokens, torch.arange(40), 0)
    plan = tiering.plan("", tokens, 0)
    tiering.chain.tiers[0].delete([plan.keys[7]])   # as a quarantine or another process would
    assert not tiering.load(plan, torch.arange(100, 140))
    assert tiering.spill("", tokens, torch.arange(40), 0) == 1
    assert tiering.load(tiering.plan("", tokens, 0), torch.arange(100, 140))
