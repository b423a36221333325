"""Spill and load between a KV pool and the host tier against a plain copy of the same bytes.

A CPU pool of SmolLM2-135M's KV shape (bf16, 30 layers, 3 KV heads of 64, 32-token pages)
spills a ``tokens``-token path into a ``HostTier`` whose blocks are one page (as the server
sizes them) and loads it back into other slots, two ways in one run, alternating:

- ``in_place``: pages gathered straight into the tier's blocks and scattered straight out
  of them (``Tier.put_in_place`` / ``Tier.read_in_place``, what the server does);
- ``staged``: through the loader's staging buffer (the path for tiers that cannot).

The limit is one ``copy_`` of the same bytes between two contiguous tensors. Every load is
checked token for token. Each figure is the median of ``repeats`` runs. ``load_in_place_runs``
loads in place into the same slots cut into four runs out of order, mid-page (a long-running
server's free list in pieces: a 4k-token host hit found its fresh slots in 4 to 9 runs).

Write-through (``through_*``): the same spill in place into a chain of the host tier over a
disk tier (``write_through``, the server's default), the time on the caller's thread (the
scheduler's, in the server); the disk writes run on the writer's thread and are waited for
untimed before the next spill. Three times: a host tier with room (``through_room``), one
that holds a single path, so each spill evicts the one before (``through_full``, a
long-running server's steady state), and one holding half a path, so a spill evicts its own
first pages (``through_over``: a prompt longer than the host tier).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sgl_kvext.pages.keys import DEFAULT_TENANT, ModelIdentity
from sgl_kvext.pages.kv_pages import PagedKV
from sgl_kvext.pages.plans import LoadPlan
from sgl_kvext.pages.tiering import KVTiering
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.disk import DiskTier
from sgl_kvext.tiers.host import HostTier

LAYERS, KV_HEADS, HEAD_DIM, PAGE_TOKENS = 30, 3, 64, 32
MODES = ("in_place", "staged")


class _StagedHostTier(HostTier):
    """The host tier without its in-place paths: the staged path, for comparison."""

    def put_in_place(self, *args: Any, **kwargs: Any) -> None:
        return None

    def read_in_place(self, *args: Any, **kwargs: Any) -> bool:
        return False


def _tiering(tier: HostTier, slots: int, below: DiskTier | None = None) -> KVTiering:
    gen = torch.Generator().manual_seed(0)
    k, v = ([torch.randn(slots, KV_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
             for _ in range(LAYERS)] for _ in range(2))
    identity = ModelIdentity("bench", "bench", "bfloat16", PAGE_TOKENS,
                             f"mha:layers={LAYERS},kv_heads={KV_HEADS},head_dim={HEAD_DIM}")
    chain = TierChain([tier], "write_back") if below is None \
        else TierChain([tier, below], "write_through")
    return KVTiering(PagedKV(k, v, PAGE_TOKENS), chain, identity, prefetch_threads=1)


def _through(tokens: int, repeats: int, page_bytes: int) -> dict[str, float]:
    """Median caller-thread seconds of a write-through spill, host tier with room / full."""
    out: dict[str, float] = {}
    pages = tokens // PAGE_TOKENS + 1
    for name, host_pages in (("through_room", (repeats + 2) * pages), ("through_full", pages),
                             ("through_over", max(1, pages // 2))):
        with tempfile.TemporaryDirectory(prefix="kvext-pool-") as folder:
            host = HostTier(host_pages * page_bytes, block_bytes=page_bytes)
            host.wait_populated(120)
            disk = DiskTier(Path(folder), 4 * (repeats + 1) * pages * page_bytes, bytes(32),
                            codec="none")
            t = _tiering(host, tokens + PAGE_TOKENS, disk)
            times = []
            try:
                for r in range(repeats + 1):                 # the first run is not counted
                    path = [(r + 1) * 10 * tokens + i for i in range(tokens)]
                    start = time.perf_counter()
                    t.spill(DEFAULT_TENANT, path, torch.arange(tokens), 0)
                    times.append(time.perf_counter() - start)
                    if not t.chain.flush(120):
                        raise AssertionError(f"{name}: the disk writes did not finish")
                    if t.chain.counters["dropped_pages"]:
                        raise AssertionError(f"{name}: pages were not written through")
            finally:
                t.close()
            out[f"spill_{name}_s"] = statistics.median(times[1:])
    return out


def _in_runs(slots: torch.Tensor) -> torch.Tensor:
    """``slots`` cut into four runs (mid-page) and put out of order."""
    n = slots.numel()
    cuts = sorted({0, n, *(min(n, c) for c in (n // 4 + 7, n // 2 + 3, 3 * n // 4 + 11))})
    pieces = [slots[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    return torch.cat(pieces[2:3] + pieces[:1] + pieces[3:] + pieces[1:2])


def _check(t: KVTiering, slots: torch.Tensor, what: str) -> None:
    """The pool's first ``len(slots)`` slots hold the spilled path: ``slots`` must too."""
    n = slots.numel()
    if not all(torch.equal(b[slots], b[:n]) for b in (*t.pool.k, *t.pool.v)):
        raise AssertionError(f"{what}: a loaded token differs from the spilled one")


def bench_pool(tokens: int, repeats: int) -> dict[str, Any]:
    """Median spill and load seconds of a ``tokens``-token path per mode, and the limit."""
    slots = 2 * tokens + PAGE_TOKENS
    page_bytes = 2 * LAYERS * PAGE_TOKENS * KV_HEADS * HEAD_DIM * 2
    host_bytes = (repeats * len(MODES) + 2) * (tokens // PAGE_TOKENS + 1) * page_bytes
    tiers = {"in_place": HostTier(host_bytes, block_bytes=page_bytes),
             "staged": _StagedHostTier(host_bytes, block_bytes=page_bytes)}
    for tier in tiers.values():
        tier.wait_populated(120)                   # the pool's pre-fault is not timed
    runs = {mode: _tiering(tier, slots) for mode, tier in tiers.items()}
    times: dict[str, dict[str, list[float]]] = {m: {"spill": [], "load": []} for m in MODES}
    times["in_place"]["load_runs"] = []
    src = torch.empty(tokens * page_bytes // PAGE_TOKENS, dtype=torch.uint8)
    dst, limit = torch.empty_like(src), []
    try:
        for r in range(repeats):
            for mode in MODES:
                t = runs[mode]
                path = [r * 10 * tokens + i for i in range(tokens)]     # new keys each run
                start = time.perf_counter()
                t.spill(DEFAULT_TENANT, path, torch.arange(tokens), 0)
                times[mode]["spill"].append(time.perf_counter() - start)
                plan = t.plan(DEFAULT_TENANT, path, 0)
                if not isinstance(plan, LoadPlan):
                    raise AssertionError(f"{mode}: the spilled path was not found: {plan}")
                to = torch.arange(tokens, tokens + plan.tokens)
                start = time.perf_counter()
                t.load(plan, to)
                times[mode]["load"].append(time.perf_counter() - start)
                _check(t, to, mode)
                if mode == "in_place":
                    to = _in_runs(to)
                    start = time.perf_counter()
                    t.load(plan, to)
                    times[mode]["load_runs"].append(time.perf_counter() - start)
                    _check(t, to, "in_place into runs")
            start = time.perf_counter()
            dst.copy_(src)
            limit.append(time.perf_counter() - start)
    finally:
        for t in runs.values():
            t.close()
    out: dict[str, Any] = {"tokens": tokens, "bytes": src.numel(), "repeats": repeats,
                           "copy_s": statistics.median(limit)}
    for mode in MODES:
        for op in times[mode]:
            out[f"{op}_{mode}_s"] = statistics.median(times[mode][op])
    out["load_runs_over_one_run"] = out["load_runs_in_place_s"] / out["load_in_place_s"]
    out.update(_through(tokens, repeats, page_bytes))
    for op in ("spill", "load"):
        out[f"{op}_staged_over_in_place"] = out[f"{op}_staged_s"] / out[f"{op}_in_place_s"]
        out[f"{op}_in_place_over_copy"] = out[f"{op}_in_place_s"] / out["copy_s"]
    return out
