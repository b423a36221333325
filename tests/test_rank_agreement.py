"""Tensor-parallel ranks agree on every admission and load (two real processes, a gloo group
on 127.0.0.1, each rank with its own KVTiering over a real host tier holding other pages)."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import traceback
from typing import Any

import pytest
import torch

from sgl_kvext.harness.server import free_port
from sgl_kvext.pages.agreement import RankAgreement
from sgl_kvext.pages.keys import DEFAULT_TENANT, ModelIdentity
from sgl_kvext.pages.kv_pages import PagedKV
from sgl_kvext.pages.plans import Hold, LoadOutcome, LoadPlan, Miss
from sgl_kvext.pages.tiering import KVTiering
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.host import HostTier

T = 4
PATH = list(range(100, 140))             # 10 pages


def _tiering(rank: int) -> KVTiering:
    gen = torch.Generator().manual_seed(rank)
    k = [torch.randn(256, 2, 4, generator=gen) for _ in range(2)]
    v = [torch.randn(256, 2, 4, generator=gen) for _ in range(2)]
    paged = PagedKV(k, v, T)
    chain = TierChain([HostTier(64 * paged.page_nbytes, block_bytes=paged.page_nbytes)])
    return KVTiering(paged, chain, ModelIdentity("c", "w", "float32", T, "mha", rank, 2),
                     prefetch_threads=1)


def _decisions(rank: int) -> dict[str, Any]:
    """What this rank decides alone and after agreeing, for three situations."""
    agree = RankAgreement(torch.distributed.group.WORLD, T)
    tiering = _tiering(rank)
    out: dict[str, Any] = {}
    # 1. rank 0 holds 8 pages of the path, rank 1 holds 5: both load 5 pages' tokens.
    held = 32 if rank == 0 else 20
    tiering.spill(DEFAULT_TENANT, PATH[:held], torch.arange(held), 0)
    alone = tiering.admit(DEFAULT_TENANT, PATH, 0, "r1")
    agreed = agree.admission(alone)
    out["alone"] = alone.tokens if isinstance(alone, LoadPlan) else None
    assert isinstance(agreed, LoadPlan)
    out["agreed"], out["pages"] = agreed.tokens, len(agreed.keys)
    slots = torch.arange(100, 100 + agreed.tokens)
    out["loaded"] = agree.outcome(tiering.load(agreed, slots, "r1")).value
    out["exact"] = all(torch.equal(b[slots], b[:agreed.tokens])
                       for b in tiering.pool.k + tiering.pool.v)
    # 2. a Hold on rank 1 holds both (rank 0 would load).
    step = Hold(8) if rank == 1 else tiering.admit(DEFAULT_TENANT, PATH, 0, "r2")
    out["hold"] = type(agree.admission(step)).__name__
    # 3. a Miss on rank 0 (nothing stored for these tokens) is a Miss for both.
    step = tiering.admit(DEFAULT_TENANT, PATH, 0, "r3") if rank else Miss()
    out["miss"] = type(agree.admission(step)).__name__
    # 4. a load that lost a page on rank 1 fails on both; MOVED beats LOADED.
    out["missing"] = agree.outcome(LoadOutcome.MISSING if rank else LoadOutcome.LOADED).value
    out["moved"] = agree.outcome(LoadOutcome.LOADED if rank else LoadOutcome.MOVED).value
    tiering.close()
    return out


def _rank(rank: int, port: int, results: Any) -> None:
    try:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                             rank=rank, world_size=2,
                                             timeout=datetime.timedelta(seconds=60))
        results.put((rank, _decisions(rank)))
        torch.distributed.destroy_process_group()
    except Exception:
        results.put((rank, traceback.format_exc()))


@pytest.fixture(scope="module")
def decisions() -> dict[int, Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()      # the harness's range: never an ephemeral port a peer may take
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for r, res in got.items():
        assert isinstance(res, dict), f"rank {r} failed:\n{res}"
    return got


def test_ranks_load_the_shortest_run_any_rank_holds(decisions: dict[int, Any]) -> None:
    assert (decisions[0]["alone"], decisions[1]["alone"]) == (32, 20)
    for r in (0, 1):
        assert decisions[r]["agreed"] == 20 and decisions[r]["pages"] == 5
        assert decisions[r]["loaded"] == "loaded" and decisions[r]["exact"]


def test_a_hold_or_a_miss_on_one_rank_is_everyone_s(decisions: dict[int, Any]) -> None:
    assert [decisions[r]["hold"] for r in (0, 1)] == ["Hold", "Hold"]
    assert [decisions[r]["miss"] for r in (0, 1)] == ["Miss", "Miss"]


def test_a_load_that_failed_on_one_rank_fails_on_all(decisions: dict[int, Any]) -> None:
    assert [decisions[r]["missing"] for r in (0, 1)] == ["missing", "missing"]
    assert [decisions[r]["moved"] for r in (0, 1)] == ["moved", "moved"]


def test_one_rank_agrees_with_itself_without_a_group() -> None:
    agree = RankAgreement(None, T)
    plan = LoadPlan((b"k",), 0, 0, 4, (0,), (0,))
    assert agree.admission(plan) is plan and agree.outcome(LoadOutcome.MOVED) is \
        LoadOutcome.MOVED
