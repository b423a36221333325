"""KVTiering loads through a bounded staging buffer or straight from the host tier's memory:
batches of pages, exact KV, misses."""

import pytest
import torch

from sgl_kvext.pages import key_chains, loads
from sgl_kvext.pages.keys import DEFAULT_TENANT as T0
from sgl_kvext.pages.keys import ModelIdentity, Tenant
from sgl_kvext.pages.kv_pages import PagedKV
from sgl_kvext.pages.plans import MISS, Hold, LoadOutcome, LoadPlan
from sgl_kvext.pages.read_ahead import ReadAhead
from sgl_kvext.pages.tiering import KVTiering
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.host import HostTier

T, LAYERS, HEADS, DIM, SLOTS = 4, 2, 2, 4, 256
IDENTITY = ModelIdentity("cfg", "weights", "float32", T, "mha:layers=2,kv_heads=2,head_dim=4")


# Host blocks of one page each (a batch is scattered from the tier's memory in place) or of
# less than a page (pages span blocks: read through the staging buffer).
@pytest.fixture(params=[1024, 100], ids=["in-place", "staged"])
def tiering(monkeypatch, request):
    monkeypatch.setattr(loads, "_STAGING_BYTES", 3 * 2 * LAYERS * T * HEADS * DIM * 4 + 1)
    gen = torch.Generator().manual_seed(0)
    k = [torch.randn(SLOTS, HEADS, DIM, generator=gen) for _ in range(LAYERS)]
    v = [torch.randn(SLOTS, HEADS, DIM, generator=gen) for _ in range(LAYERS)]
    chain = TierChain([HostTier(1 << 20, block_bytes=request.param)])
    t = KVTiering(PagedKV(k, v, T), chain, IDENTITY, prefetch_threads=1)
    yield t
    t.close()


def _kv(t, slots):
    return torch.stack([torch.stack([buf[slots] for buf in side]) for side in (t.pool.k,
                                                                             t.pool.v)])


@pytest.mark.parametrize("device_len", [0, 6, 12, 33])
def test_a_load_larger_than_the_staging_buffer_is_exact(tiering, device_len):
    tokens = list(range(1000, 1040))                      # 10 pages, 4 batches of <= 3
    tiering.spill(T0, tokens, torch.arange(40), 0)
    plan = tiering.plan(T0, tokens, device_len)
    assert (plan.start, plan.end) == (device_len, 40)
    dst = torch.arange(100, 100 + plan.tokens)
    assert tiering.load(plan, dst) is LoadOutcome.LOADED
    assert torch.equal(_kv(tiering, dst), _kv(tiering, torch.arange(device_len, 40)))
    assert tiering.loader.staging().shape[0] == 3                 # never grows with the load
    assert tiering.counters["loaded_pages"] == len(plan.keys)


def test_a_plans_new_tokens_are_counted_per_source_tier() -> None:
    # pages 2, 3, 4 (tokens 8-19); the device holds 10; the last page is a 2-token tail
    plan = LoadPlan((b"a", b"b", b"c"), 2, 10, 18, (0, 0, 0), (2, 0, 2))
    assert plan.tokens_by_source(T) == {2: 2 + 2, 0: 4}
    with pytest.raises(ValueError, match="3 tiers and 2 sources for 3 pages"):
        LoadPlan((b"a", b"b", b"c"), 2, 10, 18, (0, 0, 0), (2, 0))


def test_a_page_missing_in_a_later_batch_is_a_miss(tiering):
    tokens = list(range(2000, 2040))
    tiering.spill(T0, tokens, torch.arange(40), 0)
    plan = tiering.plan(T0, tokens, 0)
    tiering.chain.tiers[0].delete([plan.keys[7]])         # third batch
    assert tiering.load(plan, torch.arange(100, 140)) is LoadOutcome.MISSING
    assert tiering.counters == {"spilled_pages": 10, "loaded_pages": 0, "failed_loads": 1,
                                "streamed_pages": 0, "ahead_pages": 0, "hold_timeouts": 0,
                                "moved_loads": 0}


def _tiering_over(chain):
    gen = torch.Generator().manual_seed(1)
    k = [torch.randn(SLOTS, HEADS, DIM, generator=gen) for _ in range(LAYERS)]
    v = [torch.randn(SLOTS, HEADS, DIM, generator=gen) for _ in range(LAYERS)]
    return KVTiering(PagedKV(k, v, T), chain, IDENTITY, prefetch_threads=1)


def test_a_page_the_chain_dropped_is_spilled_again():
    tiering = _tiering_over(TierChain([HostTier(4 * 1024, block_bytes=1024)]))  # 4 pages
    first = list(range(3000, 3008))                          # 2 pages
    assert tiering.spill(T0, first, torch.arange(8), 0) == 2
    assert tiering.spill(T0, first, torch.arange(8), 0) == 0  # stored: skipped
    assert tiering.spill(T0, list(range(4000, 4016)), torch.arange(16, 32), 0) == 4
    assert not any(tiering.chain.tiers[0].exists(tiering.keys_for(T0, first)))  # evicted
    assert tiering.spill(T0, first, torch.arange(8), 0) == 2  # so stored again
    plan = tiering.plan(T0, first, 0)
    assert isinstance(plan, LoadPlan)
    assert tiering.load(plan, torch.arange(100, 108)) is LoadOutcome.LOADED
    assert torch.equal(_kv(tiering, torch.arange(100, 108)), _kv(tiering, torch.arange(8)))
    tiering.close()


def test_a_page_found_missing_on_load_is_spilled_again(tiering):
    tokens = list(range(5000, 5040))
    tiering.spill(T0, tokens, torch.arange(40), 0)
    plan = tiering.plan(T0, tokens, 0)
    tiering.chain.tiers[0].delete([plan.keys[7]])   # as a quarantine or another process would
    assert tiering.load(plan, torch.arange(100, 140)) is LoadOutcome.MISSING
    assert tiering.spill(T0, tokens, torch.arange(40), 0) == 1
    again = tiering.plan(T0, tokens, 0)
    assert isinstance(again, LoadPlan)
    assert tiering.load(again, torch.arange(100, 140)) is LoadOutcome.LOADED


def test_admission_loads_what_the_host_tier_holds_and_hashes_a_request_once(
        tiering, monkeypatch):
    tokens = list(range(6000, 6040))
    tiering.spill(T0, tokens, torch.arange(40), 0)
    calls = []
    real = key_chains.page_keys
    monkeypatch.setattr(key_chains, "page_keys",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(3):                       # a waiting request, matched on every pass
        step = tiering.admit(T0, tokens, 8, request_id="r1", align=4)
        assert isinstance(step, LoadPlan) and (step.start, step.end) == (8, 40)
    assert len(calls) == 1
    assert tiering.admit(T0, tokens, 8, request_id="r1", align=24) == MISS   # unaligned run
    assert tiering.admit(T0, list(range(7000, 7040)), 0, request_id="r2") == MISS
    other = Tenant(cache_salt="someone-else")
    assert tiering.admit(other, tokens, 0, request_id="r3") == MISS   # another tenant's keys
    tiering.forget("r1")
    tiering.admit(T0, tokens, 8, request_id="r1")
    assert len(calls) == 4


def test_a_continued_path_hashes_only_its_own_tokens_and_gets_the_same_keys(
        tiering, monkeypatch):
    # Nodes "a" (16 tokens) -> "b" (22 tokens: a partial page) -> "c" (40): page size 4.
    tokens = list(range(9000, 9040))
    hashed = []
    real = key_chains.page_keys
    monkeypatch.setattr(key_chains, "page_keys",
                        lambda ns, ids, **k: hashed.append(len(ids)) or real(ns, ids, **k))
    full = tiering.keys_for(T0, tokens)
    hashed.clear()
    spilled = tiering.spill(T0, tokens[:16], torch.arange(16), 0, [("a", 16)])
    assert spilled == 4 and hashed == [16]
    assert tiering.plan(T0, tokens[:22], 16, prefix=[("a", 16)]) == MISS
    assert hashed[-1] == 6                               # only past node "a"
    plan = tiering.plan(T0, tokens, 22, prefix=[("b", 22), ("a", 16)])
    assert plan == MISS and hashed[-1] == 24        # "b" unknown: from "a" on ("b" noted)
    assert tiering.spill(T0, tokens, torch.arange(40), 22, [("b", 22), ("a", 16)]) == 5
    assert hashed[-1] == 20                         # from "b" on
    assert tiering.keys.from_page(T0, tokens, 5, [("b", 22)]).keys == full[5:]
    assert tiering.plan(T0, tokens[:16], 0).keys == tuple(full[:4])
    other = Tenant(cache_salt="someone-else")
    hashed.clear()
    keys = tiering.keys.from_page(other, tokens, 5, [("b", 22)])         # not another tenant's
    assert hashed == [40] and keys.keys == tiering.keys_for(other, tokens)[5:]


@pytest.mark.parametrize("device_len", [0, 8, 40])
def test_a_spilled_paths_last_partial_page_comes_back_exactly(tiering, device_len):
    path = list(range(3000, 3042))                  # 10 full pages and 2 tokens
    assert tiering.spill(T0, path, torch.arange(42), 0) == 11
    for prompt in (path, path + [7, 8, 9]):         # the same prompt, or one that goes on
        plan = tiering.plan(T0, prompt, device_len)
        assert (plan.start, plan.end, len(plan.keys)) == (device_len, 42, 11 - device_len // T)
        slots = torch.arange(100, 100 + plan.tokens)
        assert tiering.load(plan, slots) is LoadOutcome.LOADED
        assert torch.equal(_kv(tiering, slots), _kv(tiering, torch.arange(device_len, 42)))

    def end(prompt, align=1):
        plan = tiering.plan(T0, prompt, device_len, align=align)
        return plan.end if isinstance(plan, LoadPlan) else device_len

    assert end(path[:41] + [1]) == 40               # other tail tokens: full pages only
    assert end(path, align=4) == 40                 # a tail ending off SGLang's page size
    assert end(path, align=2) == 42
    short = list(range(5000, 5003))                 # no full page at all
    tiering.spill(T0, short, torch.arange(200, 203), 0)
    assert tiering.plan(T0, short + [4], 0).end == 3


def test_admission_holds_a_request_while_its_prefetch_runs_within_the_policy(tiering):
    class NeverEndingPrefetchFake:      # a prefetch no real tier keeps running on demand
        read_ahead = ReadAhead()

        def pending(self, request_id: object) -> bool:
            return True

        def request(self, request_id: object, keys: object) -> None:
            pass

        def forget(self, request_id: object) -> None:
            pass

        def close(self) -> None:
            pass

    tiering.prefetcher = NeverEndingPrefetchFake()
    tokens = list(range(8000, 8040))
    tiering.prefetch_policy = "wait_complete"
    assert tiering.admit(T0, tokens, 0, request_id="w", align=4) == Hold(4)
    tiering.prefetch_policy = "best_effort"
    assert tiering.admit(T0, tokens, 0, request_id="w") == MISS
    tiering.prefetch_policy = "timeout"      # waiting beats recomputing only for slow prefill
    tiering.cost.prefill_tps = 1.0
    assert isinstance(tiering.admit(T0, tokens, 0, request_id="t"), Hold)
    tiering.cost.prefill_tps = 1e12
    tiering.forget("t")
    assert tiering.admit(T0, tokens, 0, request_id="t") == MISS


def test_another_prompt_under_the_same_request_id_gets_its_own_keys(tiering):
    # A request id is the client's to choose (SGLang's `rid`): two prompts of one length
    # under one id must not share remembered keys (the second would get the first's KV).
    a, b = list(range(100, 140)), list(range(200, 240))
    tiering.spill(T0, a, torch.arange(40), 0)
    assert isinstance(tiering.admit(T0, a, 0, request_id="same"), LoadPlan)
    assert tiering.admit(T0, b, 0, request_id="same") == MISS
    assert isinstance(tiering.admit(T0, a, 0, request_id="same"), LoadPlan)


def test_a_waiting_request_asks_the_tiers_for_its_tail_once(tiering) -> None:
    path = list(range(3000, 3042))                  # 10 full pages and 2 tokens
    tiering.spill(T0, path, torch.arange(42), 0)
    host = tiering.chain.tiers[0]
    asked: list[list[bytes]] = []
    real = host.exists

    def spy(keys):                                  # records what the real tier is asked
        asked.append(list(keys))
        return real(keys)

    host.exists = spy
    other = path[:41] + [1]                         # another second tail token: a miss
    for _ in range(3):                              # three scheduling passes
        assert tiering.plan(T0, other, 40, prefetch_id="r") == MISS
    tail_asks = [keys for keys in asked if len(keys) == 2]    # lengths 2 and 1, one batch
    assert len(tail_asks) == 1
    tiering.forget("r")                             # the request left: a new one asks again
    assert tiering.plan(T0, path, 40, prefetch_id="r").end == 42
    assert len([keys for keys in asked if len(keys) == 2]) == 2


@pytest.mark.parametrize("first_device_len", [42, 40])
def test_a_tail_stored_while_the_request_waits_is_found(tiering, first_device_len) -> None:
    # SGLang's cache-hit kit, 4 clients a round: a waiting request is planned while its
    # history is still on the device (42) or with the same device match (40) before the
    # history's eviction stores its 2-token tail; a remembered miss must not hide it.
    path = list(range(3000, 3042))
    prompt = path + [1, 2, 3]
    tiering.spill(T0, path[:40], torch.arange(40), 0)          # the full pages, no tail
    assert tiering.plan(T0, prompt, first_device_len, prefetch_id="r") == MISS
    tiering.spill(T0, path, torch.arange(42), 0)                # evicted: the tail too
    assert tiering.plan(T0, prompt, 40, prefetch_id="r").end == 42
