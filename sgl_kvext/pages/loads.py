"""Reading planned pages from the tier chain into the device pool (the scheduler thread).

:class:`PageLoader` serves :meth:`KVTiering.load <sgl_kvext.pages.tiering.KVTiering.load>`:
pages read ahead for the request are copied, the others read from the tier the plan found
them in, and pages that moved down since the plan are looked for in every local tier within
a time bound. Pages go through one reused staging buffer, a batch at a time, and are then
scattered into the pool's slots; on a CPU pool, a batch wholly in the host tier is scattered
straight from its memory (:meth:`Tier.read_in_place <sgl_kvext.tiers.base.Tier.read_in_place>`).

On a CUDA pool the batch is assembled in device memory: pages in a page-locked host tier are
DMA'd straight from its blocks (:meth:`Tier.read_to_device
<sgl_kvext.tiers.base.Tier.read_to_device>`), the rest cross from the pinned staging buffer.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from sgl_kvext.pages.cost_model import CostModel
from sgl_kvext.pages.kv_pages import PagedKV
from sgl_kvext.pages.plans import LoadOutcome, LoadPlan
from sgl_kvext.pages.recent_keys import RecentKeys
from sgl_kvext.tiers.base import copy_into
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.objects import KVPage

# Spills and loads go through one reused staging buffer of at most this size, in batches of
# pages: a buffer sized to the largest load would keep up to the whole pool's bytes resident.
_STAGING_BYTES = 64 << 20


class _Batch(NamedTuple):
    read: list[bool]           # per page of the batch
    spent_s: float             # expected reading of pages that moved below their planned tier
    ahead: int                 # pages copied from the read-ahead
    moved: bool                # more moved pages than the direct-read bound allows: none read


class PageLoader:
    """Loads for one pool and chain; shares the tiering's counters (under ``lock``) and its
    record of stored keys (a page found missing is forgotten there, so it is spilled again).

    ``local``: the chain indices a load may read on the scheduler thread (tier 0 first)."""

    def __init__(self, pool: PagedKV, chain: TierChain, cost: CostModel, local: list[int],
                 known: RecentKeys, counters: dict[str, int], lock: threading.Lock) -> None:
        self.pool, self.chain, self.cost, self.local = pool, chain, cost, local
        self._known, self.counters, self._lock = known, counters, lock
        self._staging: torch.Tensor | None = None

    def staging(self) -> torch.Tensor:
        """The reused (pages, page_nbytes) spill and load buffer (scheduler thread only):
        fresh memory costs page faults per use, and pinned memory from torch's allocator is
        kept by it for good.

        Allocated once at its full size, so the resident set does not step up with the
        largest load seen so far; pinned for a CUDA pool (64 MiB: a power of two, which
        torch's pinned allocator would round up to).
        """
        if self._staging is None:
            pages = max(1, _STAGING_BYTES // self.pool.page_nbytes)
            self._staging = torch.empty((pages, self.pool.page_nbytes), dtype=torch.uint8,
                                        device="cpu",
                                        pin_memory=self.pool.device.type == "cuda")
        return self._staging

    def load(self, plan: LoadPlan, slots: torch.Tensor, bound_s: float) -> LoadOutcome:
        """Copy ``plan``'s tokens into ``slots``; lower tiers are read for at most
        ``bound_s`` of expected time (see ``KVTiering.load``)."""
        staging = self.staging()
        base = plan.first_page * self.pool.tokens   # token index of the first page's first token
        budget = bound_s - sum(self.cost.load_s(self.pool.page_nbytes, t)
                               for t in plan.tiers if t)
        ahead = 0
        for lo_page in range(0, len(plan.keys), staging.shape[0]):
            keys = list(plan.keys[lo_page:lo_page + staging.shape[0]])
            tiers = plan.tiers[lo_page:lo_page + len(keys)]
            first_token = base + lo_page * self.pool.tokens
            lo = max(plan.start, first_token)
            hi = min(plan.end, first_token + len(keys) * self.pool.tokens)
            if self._in_place(keys, tiers, plan.ahead, slots[lo - plan.start:hi - plan.start],
                              lo - first_token):
                continue
            on_device = self._device_batch(keys, tiers, plan.ahead)
            direct = [False] * len(keys) if on_device is None else on_device[1]
            views = [staging[i].numpy().data for i in range(len(keys))]
            batch = self._read_into(keys, tiers, views, plan.ahead, budget, direct)
            budget -= batch.spent_s
            ahead += batch.ahead
            if batch.moved:
                with self._lock:
                    self.counters["moved_loads"] += 1
                return LoadOutcome.MOVED
            if not all(batch.read):
                self._known.discard(k for k, ok in zip(keys, batch.read, strict=True)
                                    if not ok)
                with self._lock:
                    self.counters["failed_loads"] += 1
                return LoadOutcome.MISSING
            rows = staging[:len(keys)]
            if on_device is not None:     # the pages not DMA'd from the host tier cross now
                rows = on_device[0]
                for i in (i for i, d in enumerate(direct) if not d):
                    rows[i].copy_(staging[i], non_blocking=True)
            pages = rows.view(self.pool.dtype).view(len(keys), *self.pool.page_shape)
            self.pool.scatter_tokens(slots[lo - plan.start:hi - plan.start], pages,
                                     skip=lo - first_token)
            if self.pool.device.type == "cuda":   # copies out of the staging are async:
                torch.cuda.current_stream(self.pool.device).synchronize()   # finish them
        with self._lock:
            self.counters["loaded_pages"] += len(plan.keys)
            self.counters["ahead_pages"] += ahead
        return LoadOutcome.LOADED

    def _in_place(self, keys: list[bytes], tiers: Sequence[int], ahead: Mapping[bytes, KVPage],
                  slots: torch.Tensor, skip: int) -> bool:
        """On a CPU pool, a batch wholly in tier 0 that keeps pages in its own memory (the
        host tier) is scattered into ``slots`` straight from there: one copy, not two
        through the staging buffer. Whether it was."""
        if self.pool.device.type != "cpu" or any(tiers) or any(k in ahead for k in keys):
            return False
        dtype = str(self.pool.dtype).removeprefix("torch.")
        page_elems = math.prod(self.pool.page_shape)

        def scatter(rows: torch.Tensor, index: torch.Tensor) -> None:
            pages = rows.view(self.pool.dtype)[:, :page_elems].view(-1, *self.pool.page_shape)
            self.pool.scatter_tokens(slots, pages, skip=skip, index=index)

        return self.chain.tiers[0].read_in_place(keys, dtype, self.pool.page_shape, scatter)

    def _device_batch(self, keys: list[bytes], tiers: Sequence[int],
                      ahead: Mapping[bytes, KVPage]) -> tuple[torch.Tensor, list[bool]] | None:
        """On a CUDA pool: the batch's device buffer, with the pages planned in tier 0 DMA'd
        into it where that tier can (which were); None on a CPU pool."""
        if self.pool.device.type != "cuda":
            return None
        rows = torch.empty((len(keys), self.pool.page_nbytes), dtype=torch.uint8,
                           device=self.pool.device)
        first = [i for i, (key, t) in enumerate(zip(keys, tiers, strict=True))
                 if t == 0 and key not in ahead]
        done = [False] * len(keys)
        got = self.chain.tiers[0].read_to_device([keys[i] for i in first], rows, first) \
            if first else None
        for i, ok in zip(first, got or (), strict=False):
            done[i] = ok
        return rows, done

    def _read_into(self, keys: list[bytes], tiers: Sequence[int], views: list[memoryview],
                   ahead: Mapping[bytes, KVPage], budget_s: float, done: list[bool]) -> _Batch:
        """Copy each page read ahead, read the others (but the ``done`` ones, on the device
        already) from their planned tier, then look for the ones that moved since in every
        local tier: in a lower one only while their expected reading fits ``budget_s``.
        Lower-tier reads feed the cost model's speed for that tier."""
        read = [d or _copy_page(ahead.get(key), view)
                for key, view, d in zip(keys, views, done, strict=True)]
        copied = sum(r and not d for r, d in zip(read, done, strict=True))
        planned = [(t, [i for i, at in enumerate(tiers) if at == t and not read[i]])
                   for t in sorted(set(tiers))]
        for tier, todo in planned:
            self._read_from(tier, todo, keys, views, read)
        spent = 0.0
        for tier in self.local:
            todo = [i for i, ok in enumerate(read) if not ok]
            if tier and todo:    # moved down since the plan: read here within the budget
                held = self.chain.tiers[tier].exists([keys[i] for i in todo])
                todo = [i for i, here in zip(todo, held, strict=True) if here]
                cost = self.cost.load_s(len(todo) * self.pool.page_nbytes, tier)
                if spent + cost > budget_s:
                    return _Batch(read, spent, copied, moved=True)
                spent += cost
            self._read_from(tier, todo, keys, views, read)
        return _Batch(read, spent, copied, moved=False)

    def _read_from(self, tier: int, todo: list[int], keys: list[bytes],
                   views: list[memoryview], read: list[bool]) -> None:
        """Pages ``todo`` (indices into ``keys``) from ``tier``; marks ``read``."""
        if not todo:
            return
        started = time.perf_counter()
        got = self.chain.tiers[tier].read_into([keys[i] for i in todo], [views[i] for i in todo])
        n = sum(got)
        if tier and n:
            self.cost.observe_load(tier, n * self.pool.page_nbytes,
                                   time.perf_counter() - started)
            with self._lock:
                self.counters["streamed_pages"] += n
        for i, ok in zip(todo, got, strict=True):
            read[i] = ok


def _copy_page(page: KVPage | None, dst: memoryview) -> bool:
    """Copy ``page`` into ``dst`` when it fits exactly (see ``Tier.read_into``)."""
    if page is None or page.nbytes != dst.nbytes:
        return False
    copy_into(dst, page.data)
    return True
