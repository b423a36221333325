"""Moves KV between the device KV pool and the tier chain, page by page.

The tree calls this module and knows nothing of tiers; the tiers know nothing of the tree.

- :meth:`KVTiering.spill` stores the full tier pages of a token path (e.g. an evicted node and
  the partial page it shares with its parent) under their chained page keys.
- :meth:`KVTiering.plan` finds, after the device-resident prefix, the run of pages the local
  tiers hold now (host memory, then disk: a page on disk is read straight into the pool when
  that is expected to beat recomputing it, so a load never needs the host tier to hold it),
  and asks the :class:`Prefetcher` to bring the rest up from remote tiers in the background.
- :meth:`KVTiering.admit` is the tree's one question per waiting request and scheduling
  pass: load this run now (:class:`LoadPlan`), keep waiting for a running prefetch
  (:class:`Hold`, within the prefetch policy's budget), or nothing to load (:class:`Miss`).
  A request's page keys are hashed once, not on every pass, and only after its device
  prefix (:class:`~sgl_kvext.pages.key_chains.PathKeys`).
- :meth:`KVTiering.load` copies a planned run into freshly allocated pool slots, each page
  from the tier the plan found it in (or another local tier, if it moved since, within
  :data:`DIRECT_READ_S`); any page that has gone missing makes the whole load fail (the
  caller recomputes); too many moved down make it ask for a new plan.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

from sgl_kvext.pages.cost_model import CostModel
from sgl_kvext.pages.key_chains import PathKeys
from sgl_kvext.pages.keys import ModelIdentity, Tenant, tail_key
from sgl_kvext.pages.kv_pages import PagedKV
from sgl_kvext.pages.loads import PageLoader
from sgl_kvext.pages.plans import MISS, Hold, LoadOutcome, LoadPlan, Miss
from sgl_kvext.pages.prefetch import Prefetcher
from sgl_kvext.pages.read_ahead import NOTHING
from sgl_kvext.pages.recent_keys import RecentKeys
from sgl_kvext.pages.tails import TailFinder, TailProbe
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.objects import KVPage

logger = logging.getLogger("sgl_kvext")
_KNOWN_KEYS = 1 << 16
#: Most expected time one load spends reading lower local tiers (disk) on the scheduler
#: thread; pages past it are read on the prefetcher's thread while the request is held, and
#: kept for its load (read_ahead.py), so one request's cached prompt never stalls the others'
#: decoding for long.
DIRECT_READ_S = 0.02
#: Longest a request is held for a prefetch (``wait_complete``, and the cap of ``timeout``).
WAIT_CAP_S = 30.0
PREFETCH_POLICIES = ("best_effort", "timeout", "wait_complete")


class _Run(NamedTuple):
    """The local run of a request's pages: each page's tier, then the tier the page after
    it is expected from (the slowest tier when no local tier holds it)."""

    tiers: list[int]
    rest_tier: int


class _Planned(NamedTuple):
    plan: LoadPlan | Miss
    rest_tier: int
    fetch: tuple[bytes, ...]   # to prefetch: the run and what follows, when it is cut short
    tail: list[TailProbe]      # and the partial page after what it finds (or none)


class _Wait(NamedTuple):
    until: float               # time.monotonic()
    budget_s: float


class KVTiering:
    """Page KV between one model's device pool and a tier chain.

    Parameters
    ----------
    pool
        The device pool's per-layer K / V tensors, with the tier page size.
    chain
        Tiers fastest first; tier 0 is the one loads are served from.
    identity
        Model identity: seeds every key chain (with the request's salt).
    prefetch_threads
        Background workers bringing pages up from slower tiers.
    prefetch_policy
        ``best_effort`` (never wait), ``timeout`` (wait only while loading is expected to
        beat recomputing) or ``wait_complete`` (wait up to :data:`WAIT_CAP_S`).
    """

    def __init__(self, pool: PagedKV, chain: TierChain, identity: ModelIdentity,
                 prefetch_threads: int = 2, prefetch_policy: str = "timeout") -> None:
        if identity.page_size != pool.tokens:
            raise ValueError("identity.page_size must equal the pool's tokens_per_page")
        if prefetch_policy not in PREFETCH_POLICIES:
            raise ValueError(f"prefetch policy {prefetch_policy!r}: allowed "
                             f"{', '.join(PREFETCH_POLICIES)}")
        self.prefetch_policy = prefetch_policy
        self.pool, self.chain, self.identity = pool, chain, identity
        self.tokens = pool.tokens
        self.cost = CostModel([t.name for t in chain.tiers], pool.device.type)
        self.prefetcher = Prefetcher(chain, prefetch_threads, cost=self.cost)
        # Keys stored and not seen lost since: spilling them again is skipped.
        self._known = RecentKeys(_KNOWN_KEYS)
        chain.on_loss(self._known.discard)
        # Tiers a load may read from on the scheduler thread: tier 0, then local lower ones.
        self._local = [0] + [i for i, tier in enumerate(chain.tiers)
                             if i and tier.capabilities.local]
        self._deadlines: dict[Hashable, _Wait] = {}
        self._moved: set[Hashable] = set()    # requests whose last load answered MOVED
        self.keys = PathKeys(identity, self.tokens)
        self._tails = TailFinder(chain, self._local, self.cost, self.tokens, pool.page_nbytes)
        self._lock = threading.Lock()
        self.counters = {"spilled_pages": 0, "loaded_pages": 0, "failed_loads": 0,
                         "streamed_pages": 0, "ahead_pages": 0, "hold_timeouts": 0,
                         "moved_loads": 0}
        self.loader = PageLoader(pool, chain, self.cost, self._local, self._known,
                                 self.counters, self._lock)

    def keys_for(self, tenant: Tenant, tokens: Sequence[int]) -> list[bytes]:
        """Page keys of ``tokens`` (a path from the root) for ``tenant``."""
        return self.keys.all(tenant, tokens)

    # ------------------------------------------------------------------ spill
    def spill(self, tenant: Tenant, tokens: Sequence[int], slots: torch.Tensor,
              from_token: int, prefix: Iterable[tuple[Hashable, int]] = ()) -> int:
        """Store the full pages of ``tokens`` that end after ``from_token``.

        Parameters
        ----------
        tenant
            Whose KV it is.
        tokens : (n,) ints
            The whole path from the root.
        slots : (n,) int64
            Pool slots holding the path's KV (still intact).
        from_token
            Tokens before this are stored already (or belong to another node).
        prefix
            The paths ``tokens`` continues (the evicted node's ancestors), see
            :meth:`PathKeys.from_page <sgl_kvext.pages.key_chains.PathKeys.from_page>`.

        Returns
        -------
        Pages handed to the chain.
        """
        t = self.tokens
        first = from_token // t
        chain = self.keys.from_page(tenant, tokens, first, prefix)   # pages first.. only
        full = first + len(chain.keys)
        keys = list(chain.keys)
        page_slots = slots[: full * t].view(full, t)[first:]
        n_tail = len(tokens) - full * t
        if n_tail:     # the last partial page, padded with its last slot (never read back)
            after = keys[-1] if keys else chain.before
            keys.append(tail_key(after, np.asarray(tokens[full * t:], dtype=np.int64)))
            pad = slots[full * t:]
            pad = torch.cat((pad, pad[-1:].expand(t - n_tail)))
            page_slots = torch.cat((page_slots, pad.view(1, t)))
        todo = [p for p in range(len(keys)) if not self._known.seen(keys[p])]
        if not todo:
            return 0
        self._known.add(keys[p] for p in todo)   # before put: a loss during it is heard after
        if n_tail:
            self._tails.note_stored()
        # A batch at a time, the staging buffer's size: on a CUDA pool gathered on the device
        # and DMA'd into a page-locked host tier where the chain can; on a CPU pool gathered
        # straight into the host tier's blocks where it can; else through the staging
        # buffer, whose bytes the chain copies where it keeps them (``borrowed``).
        staging = self.loader.staging()
        todo_slots = page_slots[torch.tensor(todo, dtype=torch.int64, device=page_slots.device)]
        dtype = str(self.pool.dtype).removeprefix("torch.")
        for lo in range(0, len(todo), staging.shape[0]):
            batch = [keys[p] for p in todo[lo:lo + staging.shape[0]]]
            slots_of = todo_slots[lo:lo + len(batch)]
            if self.pool.device.type == "cpu" and self._spill_in_place(batch, slots_of, dtype):
                continue
            if self.pool.device.type == "cuda":
                rows = self.pool.gather_on_device(slots_of).view(torch.uint8).view(len(batch), -1)
                if self.chain.put_from_device(batch, rows, dtype, self.pool.page_shape):
                    continue
            out = staging[:len(batch)].view(self.pool.dtype).view(len(batch),
                                                                  *self.pool.page_shape)
            self.pool.gather_pages(slots_of, out=out)
            raw = staging[:len(batch)].numpy()
            self.chain.put([KVPage(key, raw[i].data, dtype, self.pool.page_shape)
                            for i, key in enumerate(batch)], borrowed=True)
        with self._lock:
            self.counters["spilled_pages"] += len(todo)
        return len(todo)

    def _spill_in_place(self, keys: list[bytes], slots: torch.Tensor, dtype: str) -> bool:
        """Gather the pages of ``slots`` (pages, tokens) straight into the first tier's
        memory (the host tier), when the chain can; whether it did."""
        elems = math.prod(self.pool.page_shape)

        def fill(rows: torch.Tensor, index: torch.Tensor, which: torch.Tensor) -> None:
            pages = rows.view(self.pool.dtype)[:, :elems].view(-1, *self.pool.page_shape)
            self.pool.gather_into(slots[which], pages, index)

        return self.chain.put_in_place(keys, dtype, self.pool.page_shape, fill)

    # ------------------------------------------------------------------- load
    def plan(self, tenant: Tenant, tokens: Sequence[int], device_len: int,
             prefetch_id: Hashable | None = None,
             prefix: Iterable[tuple[Hashable, int]] = (), align: int = 1) -> LoadPlan | Miss:
        """The loadable run after ``device_len`` tokens, from the local tiers (no waiting):
        full pages (:meth:`_run_tiers`), then the partial page a spilled path ended with, if a
        local tier holds one for these exact tokens (ending on an ``align`` boundary).

        Pages after the run are prefetched under ``prefetch_id`` (when given), so a later call
        finds them. ``prefix``: the device match's nodes, deepest first (see
        :meth:`PathKeys.from_page <sgl_kvext.pages.key_chains.PathKeys.from_page>`).
        """
        planned = self._plan(tenant, tokens, device_len, prefetch_id, prefix, align)
        if planned.fetch and prefetch_id is not None:
            self.prefetcher.request(prefetch_id, planned.fetch, tail=planned.tail)
        return planned.plan

    def _plan(self, tenant: Tenant, tokens: Sequence[int], device_len: int,
              prefetch_id: Hashable | None, prefix: Iterable[tuple[Hashable, int]],
              align: int) -> _Planned:
        first = device_len // self.tokens
        chain = self.keys.for_request(tenant, tokens, first, prefetch_id, prefix)
        rest = chain.keys
        ahead = NOTHING if prefetch_id is None else self.prefetcher.read_ahead.peek(prefetch_id)
        tiers, rest_tier = self._run_tiers(rest, first * self.tokens - device_len, ahead)
        run = len(tiers)
        if run < len(rest) and len(self.chain.tiers) == 1:
            self._known.discard(rest[run:run + 1])   # in no tier: spill it again next time
        # the whole run, not only its rest: a read-ahead then holds every page the load needs
        fetch = tuple(rest) if run < len(rest) and len(self.chain.tiers) > 1 else ()
        probe = self._tails.probe(chain.before, fetch, first, tokens, device_len, align) \
            if fetch else []
        at = (first + run) * self.tokens
        keys, end = tuple(rest[:run]), at
        after = rest[run - 1] if run else chain.before
        for tail in self._tails.find(after, tokens, at, device_len, align, prefetch_id, ahead):
            keys, tiers, end = (*keys, tail.key), [*tiers, tail.tier], tail.end
        if end <= device_len:
            return _Planned(MISS, rest_tier, fetch, probe)
        # the read-ahead's origins only when it holds pages (a lock taken on every pass else)
        origins = (self.prefetcher.read_ahead.origins(prefetch_id)
                   if ahead and prefetch_id is not None else {})
        sources = tuple(origins.get(k, t) if k in ahead else t
                        for k, t in zip(keys, tiers, strict=True))
        return _Planned(LoadPlan(keys, first, device_len, end, tuple(tiers), sources,
                                 ahead if any(k in ahead for k in keys) else NOTHING),
                        rest_tier, fetch, probe)

    def _holder(self, key: bytes, tiers: Sequence[int]) -> list[int]:
        """``[i]`` for the first of ``tiers`` holding ``key``, else ``[]`` (a hint: it may
        move)."""
        return next(([i] for i in tiers if self.chain.tiers[i].exists([key])[0]), [])

    def _run_tiers(self, keys: Sequence[bytes], skipped: int,
                   ahead: Mapping[bytes, KVPage] = NOTHING) -> _Run:
        """The tier to read each page of the leading run of ``keys`` that the local tiers or
        ``ahead`` (read ahead, counted as tier 0) hold (the fastest holding it). Cut before
        its first page from a lower tier when reading those pages is not expected to beat
        recomputing the tokens from there (``skipped``: tokens of the first page that are on
        the device already, a negative count), and where reading lower tiers would take more
        than :data:`DIRECT_READ_S`."""
        slowest = len(self.chain.tiers) - 1
        if not keys:
            return _Run([], slowest)
        held = self.chain.tiers[0].exists(keys)
        tiers: list[int] = []
        spent, rest_tier = 0.0, slowest
        for key, here in zip(keys, held, strict=True):
            holder = [0] if here or key in ahead else self._holder(key, self._local[1:])
            if not holder:
                break
            if holder[0]:
                spent += self.cost.load_s(self.pool.page_nbytes, holder[0])
                if spent > DIRECT_READ_S:
                    rest_tier = holder[0]
                    break
            tiers.append(holder[0])
        lower = next((i for i, t in enumerate(tiers) if t), len(tiers))
        if lower < len(tiers):
            page_bytes = self.pool.page_nbytes
            load_s = sum(self.cost.load_s(page_bytes * tiers.count(t), t)
                         for t in set(tiers[lower:]) - {0})
            if load_s >= self.cost.recompute_s((len(tiers) - lower) * self.tokens
                                               + (skipped if lower == 0 else 0)):
                rest_tier = tiers[lower]
                del tiers[lower:]
        return _Run(tiers, rest_tier)

    def admit(self, tenant: Tenant, tokens: Sequence[int], device_len: int,
              request_id: Hashable, align: int = 1,
              prefix: Iterable[tuple[Hashable, int]] = ()) -> LoadPlan | Hold | Miss:
        """What to do for a waiting request whose device match ends at ``device_len``: load
        a run now, hold it for its running prefetch (prefetch policy), or nothing. A run that
        does not end on an ``align`` boundary (SGLang's page size) is not loaded.
        ``prefix``: the device match's nodes (see :meth:`plan`)."""
        # Asked before the plan peeks at the read-ahead: a prefetch finishing in between
        # leaves this plan without its pages, so the request is held for one more pass.
        running = self.prefetcher.pending(request_id)
        plan, rest_tier, fetch, tail = self._plan(tenant, tokens, device_len, request_id,
                                                  prefix, align)
        if isinstance(plan, LoadPlan) and plan.tokens % align:
            plan = MISS
        if self.prefetch_policy == "best_effort" or not (fetch or running):
            if fetch:     # never waited for: read into tier 0 for the next request
                self.prefetcher.request(request_id, fetch, tail=tail)
            self._deadlines.pop(request_id, None)
            return plan
        wait = self._wait(request_id, len(tokens), plan, device_len, rest_tier)
        if fetch:    # read ahead for a request that will wait for it; else for the next one
            running |= self.prefetcher.request(request_id, fetch, keep=wait.budget_s > 0,
                                               tail=tail)
        if not running:
            self._deadlines.pop(request_id, None)
            return plan
        if time.monotonic() < wait.until:
            return Hold(plan.tokens if isinstance(plan, LoadPlan) else align)
        if wait.budget_s > 0:
            with self._lock:      # held, then let go while its prefetch still runs
                self.counters["hold_timeouts"] += 1
        return plan

    def _wait(self, request_id: Hashable, n_tokens: int, plan: LoadPlan | Miss,
              device_len: int, rest_tier: int) -> _Wait:
        """How long the request may be held for its prefetch (of pages expected from
        ``rest_tier`` or faster), fixed at its first pass by the prefetch policy."""
        wait = self._deadlines.get(request_id)
        if wait is None:
            missing = n_tokens - (plan.end if isinstance(plan, LoadPlan) else device_len)
            if self.prefetch_policy == "wait_complete":
                budget = WAIT_CAP_S
            else:
                budget = self.cost.hold_budget_s(missing, self.bytes_per_token, WAIT_CAP_S,
                                                 rest_tier, local=rest_tier in self._local)
            wait = self._deadlines[request_id] = _Wait(time.monotonic() + budget, budget)
        return wait

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """A prefill of ``tokens`` took ``seconds`` (the cost model's recompute speed)."""
        self.cost.observe_prefill(tokens, seconds)

    def forget(self, request_id: Hashable) -> None:
        """The request left: drop its wait deadline, cached keys and prefetch."""
        self._deadlines.pop(request_id, None)
        self._moved.discard(request_id)
        self.keys.forget(request_id)
        self._tails.forget(request_id)
        self.prefetcher.forget(request_id)

    def load(self, plan: LoadPlan, slots: torch.Tensor,
             request_id: Hashable | None = None) -> LoadOutcome:
        """Copy the planned tokens into ``slots`` (``plan.tokens`` of them). The pages read
        ahead for ``request_id`` are released (SGLang may match a waiting request more than
        once per pass: they stay until the load that uses them).

        A page that moved since the plan is read from the local tier holding it now, as long
        as the load's expected reading of lower tiers stays within :data:`DIRECT_READ_S`
        (a small host tier demotes pages between plan and load); past that it reads none and
        answers ``MOVED``: plan again, with the pages where they are now (the read-ahead is
        kept). The next load for ``request_id`` reads moved pages without a bound, so a
        request is re-planned at most once.
        Pages are read and scattered in batches that fit the staging buffer; unless ``LOADED``
        the slots may hold part of the KV and must be freed by the caller, never used.
        """
        if slots.numel() != plan.tokens:
            raise ValueError(f"{slots.numel()} slots for {plan.tokens} tokens")
        bounded = request_id not in self._moved
        outcome = self.loader.load(plan, slots, DIRECT_READ_S if bounded else float("inf"))
        if request_id is not None:
            if outcome is LoadOutcome.MOVED:
                self._moved.add(request_id)
            else:
                self._moved.discard(request_id)
                self.prefetcher.read_ahead.drop(request_id)
        return outcome

    def tokens_by_tier(self, plan: LoadPlan) -> dict[str, int]:
        """``plan``'s new tokens per tier name, by where each page came from for the request
        (:attr:`LoadPlan.sources`)."""
        return {self.chain.tiers[t].name: n
                for t, n in sorted(plan.tokens_by_source(self.tokens).items())}

    @property
    def bytes_per_token(self) -> float:
        return self.pool.page_nbytes / self.tokens

    def close(self) -> None:
        self.prefetcher.close()
        self.chain.close()
