"""Background reads of a waiting request's pages from slow tiers (disk, S3).

A request's prefetch starts the first time the tree sees it waiting; the scheduler never
waits on it. Requests are keyed by an id (the request handle): one prefetch per id until
:meth:`Prefetcher.forget` (the request left), so the pages no tier holds (the prompt's new
tokens) are asked for once, not again on every scheduling pass while admission waits for a
prefetch to finish. At most ``max_pending`` prefetches queue up; beyond that new ones are
dropped (and counted), so a burst cannot build an unbounded backlog.

Where the pages go: for a request that waits for them (``keep``), the run is kept for it
(:class:`ReadAhead`, bounded) and its load copies it from there; otherwise, or when the
read-ahead has no room, the pages read from below tier 0 are promoted into tier 0 for later
requests. (Promoting a waiting request's run instead would, for a run larger than the host
tier, only push the run's own host pages down to disk, its puts holding the host tier's lock
against the scheduler's lookups.)
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from sgl_kvext.pages.cost_model import CostModel
from sgl_kvext.pages.read_ahead import ReadAhead
from sgl_kvext.pages.tails import TailProbe
from sgl_kvext.tiers.chain import TierChain


class Prefetcher:
    def __init__(self, chain: TierChain, threads: int = 2, max_pending: int = 256,
                 cost: CostModel | None = None, read_ahead: ReadAhead | None = None) -> None:
        self.chain, self.cost = chain, cost
        self.read_ahead = read_ahead if read_ahead is not None else ReadAhead()
        self.max_pending = max_pending
        self._pool = ThreadPoolExecutor(max(threads, 1), thread_name_prefix="kvext-prefetch")
        #: Prefetches by request id, oldest first: running ones, and finished ones until
        #: :meth:`forget` (or until more than ``4 * max_pending`` have finished).
        self._running: OrderedDict[Hashable, Future[int]] = OrderedDict()
        self._lock = threading.Lock()
        self.counters = {"started": 0, "dropped": 0, "promoted_pages": 0, "seconds_x1000": 0}

    def request(self, request_id: Hashable, keys: Sequence[bytes], keep: bool = False,
                tail: Sequence[TailProbe] = ()) -> bool:
        """Read the longest held run of ``keys`` in the background, and with a ``tail``
        probe the partial page stored after that run: for the request's load (``keep``: the
        request waits for it), or into tier 0 for later requests. True when this call
        started it (False: one ran for this id already, or too many queue)."""
        with self._lock:
            if request_id in self._running:     # running, or done: once per request
                return False
            if sum(not f.done() for f in self._running.values()) >= self.max_pending:
                self.counters["dropped"] += 1
                return False
            self.counters["started"] += 1
            self._running[request_id] = self._pool.submit(self._fetch, request_id, list(keys),
                                                          keep, tuple(tail))
            excess = len(self._running) - 4 * self.max_pending
            for rid in [r for r, f in self._running.items() if f.done()][:max(0, excess)]:
                del self._running[rid]          # the oldest finished ones, past the bound
                self.read_ahead.drop(rid)
        return True

    def forget(self, request_id: Hashable) -> None:
        """The request left: a new one under its id may prefetch again."""
        with self._lock:
            self._running.pop(request_id, None)
            self.read_ahead.drop(request_id)

    def pending(self, request_id: Hashable) -> bool:
        with self._lock:
            future = self._running.get(request_id)
        return future is not None and not future.done()

    def wait(self, request_id: Hashable, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a running prefetch; True when none is left running."""
        with self._lock:
            future = self._running.get(request_id)
        if future is None:
            return True
        try:
            future.result(timeout=timeout_s)
        except Exception:   # a failed prefetch is only a miss
            return future.done()
        return True

    def _fetch(self, request_id: Hashable, keys: list[bytes], keep: bool,
               tail: tuple[TailProbe, ...]) -> int:
        start = time.perf_counter()
        got = self.chain.get(keys, promote=False)       # the held run, from any tier
        pages, tiers = list(got.pages), list(got.tiers)
        for probe in tail if pages else ():    # and the partial page after a run found
            after = probe.keys_after(len(pages))
            if after:
                found = self.chain.get_first(after)
                pages += found.pages
                tiers += found.tiers
        seconds = time.perf_counter() - start
        below = [(p, t) for p, t in zip(pages, tiers, strict=True) if t > 0]
        with self._lock:                  # not for a request that left meanwhile
            kept = keep and bool(below) and request_id in self._running \
                and self.read_ahead.keep(request_id, pages, tiers)
        promoted = 0 if kept else len(below)
        if promoted:
            self.chain.promote([p for p, _ in below])
        if below and self.cost is not None:   # attributed to the slowest tier involved
            self.cost.observe_load(max(t for _, t in below), sum(p.nbytes for p, _ in below),
                                   seconds)
        with self._lock:
            self.counters["promoted_pages"] += promoted
            self.counters["seconds_x1000"] += int(seconds * 1000)
        return promoted

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
