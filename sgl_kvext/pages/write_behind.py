"""Spill copies run on one background thread, so the scheduler thread never copies pages
for a write-through.

The owner (the scheduler thread) submits a :class:`~sgl_kvext.pages.tiering.SpillJob` with a
*token* standing for what keeps the job's pool slots intact (a locked tree node). The worker
copies the pages out and stores them; the owner learns which tokens are done from
:meth:`WriteBehind.done` and only then releases them. Invariant: a token leaves this object
(through :meth:`done`, :meth:`cancel_queued` or :meth:`close`) only when its job is not
running, so the slots it holds are never read after their release.

Bounded: at most ``capacity`` jobs wait; :meth:`submit` refuses more and the owner copies on
its own thread (nothing is lost). A job that fails is logged and counted, and its pages are
recomputed on their next use (as for any lost page).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from sgl_kvext.pages.plans import SpillJob

logger = logging.getLogger("sgl_kvext")
Token = TypeVar("Token")
#: Jobs waiting at most (one finished request each).
CAPACITY = 64


class WriteBehind(Generic[Token]):
    """One worker thread running ``store(job, token)`` on submitted jobs, in order."""

    def __init__(self, store: Callable[[SpillJob, Token], int], capacity: int = CAPACITY,
                 name: str = "kvext-write-behind") -> None:
        if capacity < 1:
            raise ValueError(f"capacity {capacity}: must be >= 1")
        self._store, self.capacity = store, capacity
        self._cond = threading.Condition()
        self._queued: deque[tuple[SpillJob, Token]] = deque()
        self._busy = False
        self._done: list[Token] = []
        self._closed = False
        self.counters = {"jobs": 0, "pages": 0, "failed": 0, "refused": 0}
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        with self._cond:
            return len(self._queued) + int(self._busy)

    def submit(self, job: SpillJob, token: Token) -> bool:
        """Queue ``job``; False (nothing queued) when full or closed: copy it yourself."""
        with self._cond:
            if self._closed or len(self._queued) >= self.capacity:
                self.counters["refused"] += 1
                return False
            self._queued.append((job, token))
            self._cond.notify_all()
            return True

    def done(self) -> list[Token]:
        """Tokens of the jobs finished since the last call (their slots may be released)."""
        with self._cond:
            out, self._done = self._done, []
            return out

    def cancel_queued(self) -> list[Token]:
        """Drop the jobs not started yet (their pages are not stored) and return their
        tokens; the running one, if any, finishes."""
        with self._cond:
            out = [token for _, token in self._queued]
            self._queued.clear()
            return out

    def wait(self, timeout: float) -> bool:
        """Wait until nothing is queued or running (at most ``timeout`` s); True if so."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queued and not self._busy, timeout)

    def wait_running(self, timeout: float) -> bool:
        """Wait until no job is running (at most ``timeout`` s); True if so."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._busy, timeout)

    def close(self, timeout: float = 10.0) -> list[Token]:
        """Finish the queued jobs (within ``timeout`` s, then drop the rest), stop the
        worker and return every token not yet returned."""
        finished = self.wait(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if not finished:
            logger.warning("sgl-kvext: write-behind did not finish within %.0f s; "
                           "dropping %d queued spill(s)", timeout, len(self._queued))
        dropped = self.cancel_queued()
        self._thread.join(timeout)
        return self.done() + dropped

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queued or self._closed)
                if not self._queued:
                    return                                   # closed and drained
                job, token = self._queued.popleft()
                self._busy = True
            try:
                pages = self._store(job, token)
                failed = False
            except Exception:   # a tier failure loses these pages to recomputation only
                logger.exception("sgl-kvext: storing %d spilled pages failed; they will be "
                                 "recomputed", len(job.keys))
                pages, failed = 0, True
            with self._cond:
                self._busy = False
                self._done.append(token)
                self.counters["jobs"] += 1
                self.counters["pages"] += pages
                self.counters["failed"] += int(failed)
                self._cond.notify_all()
