"""Asynchronous writes to a chain's lower tiers, and pages written through later.

- :class:`Writer`: one thread per lower tier draining a queue bounded in bytes; a batch that
  does not fit is refused at once (the scheduler never waits). Queued pages stay readable
  until their tier holds them.
- :class:`DeferredPages`: write-through of pages stored straight into the first tier's memory
  (``TierChain.put_in_place``) without copying them on the caller's thread. The writers read
  each page out of the first tier when they get to it (:meth:`Tier.peek`); a page the first
  tier evicts before every writer has read it is read out by the eviction, before its memory
  is reused, and kept here until they have (the first tier asks :meth:`DeferredPages.wants`
  under its lock). So a deferred page is always readable, from the first tier or from here,
  until every writer is done with it; only a writer's own failure loses it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

from sgl_kvext.tiers.base import Tier
from sgl_kvext.tiers.objects import KVPage

logger = logging.getLogger("sgl_kvext")


class Later(NamedTuple):
    """A page to be read out of the first tier when its writer gets to it."""

    key: bytes
    nbytes: int


Item = KVPage | Later


class DeferredPages:
    """Pages of the first tier each of ``readers`` writers still has to read (see module)."""

    def __init__(self, first: Tier) -> None:
        self._first = first
        self._lock = threading.Lock()
        self._readers: dict[bytes, int] = {}
        self._kept: dict[bytes, KVPage] = {}

    def add(self, keys: Sequence[bytes], readers: int) -> None:
        """``keys``, about to be stored in the first tier, are each to be read by ``readers``
        more writers."""
        if readers <= 0:
            return
        with self._lock:
            for key in keys:
                self._readers[key] = self._readers.get(key, 0) + readers

    def wants(self, key: bytes) -> bool:
        """Whether an eviction of ``key`` from the first tier must read its bytes (:meth:`keep`)."""
        with self._lock:
            return key in self._readers

    def keep(self, page: KVPage) -> None:
        """Bytes the first tier read out of a page it evicts, for the writers still to read it."""
        with self._lock:
            if page.key in self._readers:
                self._kept[page.key] = page

    def read(self, key: bytes) -> KVPage | None:
        """The page's bytes (the caller's own copy or the kept one); None once lost."""
        with self._lock:
            page = self._kept.get(key)
        if page is None:
            page = self._first.peek([key]).get(key)
        if page is None:      # evicted since the first look: the eviction kept it, under its lock
            with self._lock:
                page = self._kept.get(key)
        return page

    def done(self, keys: Sequence[bytes], readers: int = 1) -> None:
        """``readers`` writers are finished with ``keys`` (written, refused or dropped)."""
        if readers <= 0:
            return
        with self._lock:
            for key in keys:
                left = self._readers.get(key, 0) - readers
                if left > 0:
                    self._readers[key] = left
                else:
                    self._readers.pop(key, None)
                    self._kept.pop(key, None)


class Writer:
    """Asynchronous writer for one lower tier; its queued pages stay readable.

    ``store(pages)`` writes a batch (the chain's, on this thread); ``failed(keys)`` hears of
    a batch lost to an exception or to a deferred page that could not be read."""

    def __init__(self, index: int, max_bytes: int, deferred: DeferredPages,
                 store: Callable[[int, list[KVPage]], None],
                 failed: Callable[[Sequence[bytes]], None]) -> None:
        self.index, self.max_bytes, self.deferred = index, max_bytes, deferred
        self._store, self._failed = store, failed
        self.queue: queue.Queue[list[Item] | None] = queue.Queue()   # bounded by bytes
        self.pending: dict[bytes, Item] = {}
        self.queued_bytes = 0         # of batches submitted and not yet written
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"kvext-tier{index}-writer",
                                       daemon=True)
        self.thread.start()

    def submit(self, items: Sequence[Item]) -> bool:
        """Queue ``items`` unless the bytes queued would pass the bound (one batch is always
        taken when nothing is queued); never blocks."""
        nbytes = sum(i.nbytes for i in items)
        with self.lock:
            if self.queued_bytes and self.queued_bytes + nbytes > self.max_bytes:
                return False
            self.queued_bytes += nbytes
            self.pending.update({i.key: i for i in items})
        self.queue.put(list(items))
        return True

    def read(self, keys: Sequence[bytes]) -> dict[bytes, KVPage]:
        """Queued pages of ``keys`` (deferred ones read where they are)."""
        with self.lock:
            items = [self.pending[k] for k in keys if k in self.pending]
        out = {}
        for item in items:
            page = self.deferred.read(item.key) if isinstance(item, Later) else item
            if page is not None:
                out[item.key] = page
        return out

    def _run(self) -> None:
        while True:
            batch = self.queue.get()
            if batch is None:
                self.queue.task_done()
                return
            later = [i.key for i in batch if isinstance(i, Later)]
            try:
                pages = [i if isinstance(i, KVPage) else self.deferred.read(i.key)
                         for i in batch]
                unread = [i.key for i, p in zip(batch, pages, strict=True) if p is None]
                if unread:
                    self._failed(unread)
                self._store(self.index, [p for p in pages if p is not None])
            except Exception:        # a tier that raises drops the batch; the writer lives on
                logger.exception("sgl-kvext: tier %d write failed; %d pages dropped",
                                 self.index, len(batch))
                self._failed([i.key for i in batch])
            finally:
                with self.lock:
                    for i in batch:
                        self.pending.pop(i.key, None)
                    self.queued_bytes -= sum(i.nbytes for i in batch)
                self.deferred.done(later)
                self.queue.task_done()
