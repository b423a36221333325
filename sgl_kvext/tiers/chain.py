"""The tier chain: ordered tiers (fastest first) acting as one store.

- ``put`` stores pages in the first tier. What it evicts is *demoted* to the next tier
  (write-back); with ``write_through`` every stored page is also copied to all lower tiers
  as it is stored, and an eviction copies nothing (``Tier.keep_evicted`` off).
  Pages a tier rejects (too large) go to the next one.
- Writes to lower tiers are asynchronous: one writer thread per lower tier drains a bounded
  queue bounded in bytes; a batch that does not fit is dropped at once and counted (a put
  never blocks: it runs on the scheduler thread). Queued pages stay readable until written
  (a read of one counts as a hit of its tier).
- ``lookup`` answers, for consecutive page keys, the longest run held from the start and the
  tier of each page; ``get`` loads that run and promotes pages found below into the first tier.
- Loss listeners (``on_loss``) hear of every page this process sees leave the chain, so a
  caller that remembers what it stored can store it again.
- Event listeners (``on_event``) hear which pages each tier stored or removed (for SGLang's
  KV events, by tier).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from sgl_kvext.tiers.base import PutResult, Tier
from sgl_kvext.tiers.metrics import MeteredTier
from sgl_kvext.tiers.objects import KVPage, page_nbytes
from sgl_kvext.tiers.write_queue import DeferredPages, Item, Later, Writer

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("sgl_kvext")

WRITE_POLICIES = ("write_back", "write_through")
LossListener = Callable[[Sequence[bytes]], None]


class TierEvent(NamedTuple):
    """Pages ``keys`` entered (``stored``) or left tier ``tier`` (its index in the chain)."""

    stored: bool
    tier: int
    keys: tuple[bytes, ...]


EventListener = Callable[[TierEvent], None]


@dataclass(frozen=True, slots=True)
class ChainLookup:
    """The first ``run`` keys are held; ``tiers[i]`` is the fastest tier holding key ``i``."""

    run: int
    tiers: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ChainGet:
    """Pages of the longest held run from the start, and the tier each came from."""

    pages: tuple[KVPage, ...]
    tiers: tuple[int, ...]


class TierChain:
    """Tiers fastest first, e.g. ``[HostTier, DiskTier, S3Tier]``.

    Parameters
    ----------
    tiers
        At least one tier.
    write_policy
        ``write_back`` (lower tiers receive what upper tiers evict) or ``write_through``
        (lower tiers also receive every page as it is put).
    queue_bytes
        Bound of each lower tier's write queue, in bytes of KV (a batch that would pass it
        is dropped, never waited for).
    """

    def __init__(self, tiers: Sequence[Tier], write_policy: str = "write_back",
                 queue_bytes: int = 1 << 30) -> None:
        if not tiers:
            raise ValueError("a tier chain needs at least one tier")
        if write_policy not in WRITE_POLICIES:
            raise ValueError(f"unknown write policy {write_policy!r}; allowed: "
                             f"{', '.join(WRITE_POLICIES)}")
        self.tiers = list(tiers)
        self.write_policy = write_policy
        for index, tier in enumerate(self.tiers):   # evictions read only what is demoted
            tier.keep_evicted = write_policy == "write_back" and index + 1 < len(self.tiers)
        self._deferred = DeferredPages(self.tiers[0])
        self.tiers[0].eviction_sink = self._deferred
        self._writers = {i: Writer(i, queue_bytes, self._deferred, self._store, self._failed)
                         for i in range(1, len(self.tiers))}
        self._lock = threading.Lock()
        self._loss_listeners: list[LossListener] = []
        self._event_listeners: list[EventListener] = []
        self.counters = {"dropped_pages": 0, "demoted_pages": 0, "promoted_pages": 0}

    def on_loss(self, listener: LossListener) -> None:
        """Call ``listener(keys)`` whenever pages may have left the chain.

        Reported (on the thread that saw it, so ``listener`` must be quick and thread-safe):
        pages the last tier evicts or rejects, batches dropped from a full queue or by a
        failed write (under write-through an upper copy may remain), and the first key a
        ``lookup`` or ``get`` finds in no tier. Drops made by other processes sharing a tier
        are only seen by the latter.
        """
        self._loss_listeners.append(listener)

    def put(self, pages: Sequence[KVPage], borrowed: bool = False) -> None:
        """Store ``pages`` in the first tier (and below, per the write policy).

        ``borrowed``: the pages' bytes are the caller's to reuse once this returns, so every
        page queued for a lower tier is copied first (the first tier copies on ``put``)."""
        pages = list(pages)
        self._store(0, pages, borrowed)
        if self.write_policy == "write_through":
            queued = [_owned(p) for p in pages] if borrowed else pages
            for index in self._writers:
                self._enqueue(index, queued)

    def put_in_place(self, keys: Sequence[bytes], dtype: str, shape: tuple[int, ...],
                     fill: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]) -> bool:
        """Store pages that ``fill`` writes straight into the first tier's memory (see
        :meth:`Tier.put_in_place`), when it can take them; False: nothing was stored, pass
        bytes to :meth:`put`. The pages it wrote are written through later: each writer
        reads them out of the first tier itself (:class:`DeferredPages`), so the caller's
        thread copies nothing for the lower tiers (pages it held already went down)."""
        through = self.write_policy == "write_through" and bool(self._writers)
        unique = list(dict.fromkeys(keys))
        readers = len(self._writers) if through else 0
        self._deferred.add(unique, readers)   # before any other thread's put can evict them
        written: list[int] = []

        def fill_and_note(rows: torch.Tensor, index: torch.Tensor, which: torch.Tensor) -> None:
            fill(rows, index, which)
            written.extend(int(w) for w in which)

        result = None
        try:
            result = self.tiers[0].put_in_place(keys, dtype, shape, fill_and_note)
        finally:
            new = {keys[w] for w in written} if result is not None else set()
            self._deferred.done([k for k in unique if k not in new], readers)
        if result is None:
            return False
        self._settle(0, result, [])
        nbytes = page_nbytes(dtype, shape)
        later = [Later(k, nbytes) for k in unique if k in new]
        for index in self._writers if through and later else ():
            self._enqueue(index, later)
        return True

    def put_from_device(self, keys: Sequence[bytes], rows: torch.Tensor, dtype: str,
                        shape: tuple[int, ...]) -> bool:
        """Store pages whose bytes are the rows of a CUDA uint8 tensor straight into the
        first tier (DMA into a page-locked host tier), when it can take them; False: nothing
        was stored, pass host bytes to :meth:`put`. Pages written through, or refused by the
        first tier, cross to host memory of their own (the rows are the caller's)."""
        result = self.tiers[0].put_from_device(keys, rows, dtype, shape)
        if result is None:
            return False
        through = self.write_policy == "write_through" and bool(self._writers)
        rejected = set(result.rejected)
        pages: list[KVPage] = []
        if through or rejected:
            host = rows.to("cpu", copy=True).numpy()      # one copy for every queue
            pages = [KVPage(k, host[i].data, dtype, shape) for i, k in enumerate(keys)]
        self._settle(0, result, [p for p in pages if p.key in rejected] if rejected else [])
        if through:
            for index in self._writers:
                self._enqueue(index, pages)
        return True

    def lookup(self, keys: Sequence[bytes]) -> ChainLookup:
        holder: list[int | None] = [None] * len(keys)
        for t in range(len(self.tiers)):
            todo = [i for i, h in enumerate(holder) if h is None]
            if not todo:
                break
            for i, held in zip(todo, self._exists(t, [keys[i] for i in todo]), strict=True):
                if held:
                    holder[i] = t
        run = next((i for i, h in enumerate(holder) if h is None), len(keys))
        if run < len(keys):
            self._lost(keys[run:run + 1])
        return ChainLookup(run, tuple(int(h) for h in holder[:run] if h is not None))

    def get(self, keys: Sequence[bytes], promote: bool = True) -> ChainGet:
        """Load the longest held run of ``keys``; pages found below tier 0 are promoted
        (unless ``promote`` is false: see :meth:`promote`)."""
        found = self.lookup(keys)
        by_tier: dict[int, list[bytes]] = {}
        for i in range(found.run):
            by_tier.setdefault(found.tiers[i], []).append(keys[i])
        loaded: dict[bytes, tuple[KVPage, int]] = {}
        for t, tier_keys in by_tier.items():
            for key, page in self._get(t, tier_keys).items():
                loaded[key] = (page, t)
        pages: list[KVPage] = []
        tiers: list[int] = []
        for key in keys[:found.run]:      # a page lost since the lookup ends the run there
            if key not in loaded:
                self._lost([key])
                break
            pages.append(loaded[key][0])
            tiers.append(loaded[key][1])
        if promote:
            self.promote([p for p, t in zip(pages, tiers, strict=True) if t > 0])
        return ChainGet(tuple(pages), tuple(tiers))

    def get_first(self, keys: Sequence[bytes]) -> ChainGet:
        """The first of ``keys`` (alternatives, best first) the fastest tier holding any of
        them holds: that one page, or none. Not promoted; a miss is not a loss."""
        for t in range(len(self.tiers)):
            held = self._exists(t, list(keys))
            if any(held):
                key = keys[held.index(True)]
                page = self._get(t, [key]).get(key)
                return ChainGet((page,), (t,)) if page is not None else ChainGet((), ())
        return ChainGet((), ())

    def promote(self, pages: Sequence[KVPage]) -> None:
        """Store ``pages``, read from lower tiers, in tier 0 (what it evicts moves down)."""
        if pages:
            self._store(0, list(pages))
            with self._lock:
                self.counters["promoted_pages"] += len(pages)

    def on_event(self, listener: EventListener) -> None:
        """Call ``listener(event)`` for the pages each tier of this process stores (puts,
        demotions, write-through, promotions) and removes (evictions, deletions); on the
        thread that did it, so ``listener`` must be quick and thread-safe. What other
        processes sharing a tier store or remove is not heard."""
        self._event_listeners.append(listener)

    def delete(self, keys: Sequence[bytes]) -> None:
        self.flush()
        for index, tier in enumerate(self.tiers):
            if tier.delete(keys):
                self._emit(False, index, keys)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued write reached its tier (at most ``timeout_s`` in all);
        whether they all did. No thread is started: a stuck tier costs the caller the
        timeout, nothing more."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for writer in self._writers.values():
            q = writer.queue
            with q.all_tasks_done:        # Queue.join() with a deadline
                while q.unfinished_tasks:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    q.all_tasks_done.wait(left)
        return True

    def close(self, timeout_s: float = 30.0) -> None:
        self.flush(timeout_s)
        for writer in self._writers.values():
            writer.queue.put(None)
            writer.thread.join(timeout_s)
        for tier in self.tiers:
            tier.close()

    # ------------------------------------------------------------- internals
    def _store(self, index: int, pages: list[KVPage], borrowed: bool = False) -> None:
        result = self.tiers[index].put(pages)
        rejected = set(result.rejected)
        self._settle(index, result, [_owned(p) if borrowed else p for p in pages
                                     if p.key in rejected])

    def _settle(self, index: int, result: PutResult, rejected: list[KVPage]) -> None:
        """Events for a put into tier ``index``; its evicted and ``rejected`` pages go down.
        Under write-through evictions are dropped (their pages went down when stored, or
        were reported lost when their write was dropped); from the last tier they are lost."""
        self._emit(True, index, result.stored)
        self._emit(False, index, [p.key for p in result.evicted] + list(result.dropped))
        if result.dropped and index + 1 == len(self.tiers):
            self._lost(result.dropped)
        overflow = [*result.evicted, *rejected]     # the tier's own copies, the caller's
        if overflow and index + 1 < len(self.tiers):
            with self._lock:
                self.counters["demoted_pages"] += len(result.evicted)
            self._enqueue(index + 1, overflow)
        elif overflow:                    # evicted from, or refused by, the last tier
            self._lost([p.key for p in overflow])

    def _enqueue(self, index: int, items: Sequence[Item]) -> None:
        if not self._writers[index].submit(items):
            self._deferred.done([i.key for i in items if isinstance(i, Later)])
            self._failed([i.key for i in items])

    def _failed(self, keys: Sequence[bytes]) -> None:
        """Pages that did not reach a lower tier (a full queue, a write that raised)."""
        with self._lock:
            self.counters["dropped_pages"] += len(keys)
        self._lost(keys)

    def _lost(self, keys: Sequence[bytes]) -> None:
        for listener in self._loss_listeners:
            try:
                listener(keys)
            except Exception:      # a listener's bug must not break a write or a read
                logger.exception("sgl-kvext: a tier-chain loss listener failed")

    def _emit(self, stored: bool, index: int, keys: Sequence[bytes]) -> None:
        if keys and self._event_listeners:
            event = TierEvent(stored, index, tuple(keys))
            for listener in self._event_listeners:
                try:
                    listener(event)
                except Exception:      # a listener's bug must not break a write
                    logger.exception("sgl-kvext: a tier-chain event listener failed")

    def _exists(self, index: int, keys: list[bytes]) -> list[bool]:
        writer = self._writers.get(index)
        if writer is None:
            return self.tiers[index].exists(keys)
        # Queued first, the tier second: a page leaves the queue only once its tier holds it,
        # so a write finishing between the two looks is seen by one of them.
        with writer.lock:
            queued = [k in writer.pending for k in keys]
        held = self.tiers[index].exists(keys)
        return [q or h for q, h in zip(queued, held, strict=True)]

    def _get(self, index: int, keys: list[bytes]) -> dict[bytes, KVPage]:
        writer = self._writers.get(index)
        queued = writer.read(keys) if writer is not None else {}
        tier = self.tiers[index]
        if queued and isinstance(tier, MeteredTier):     # a hit of this tier all the same
            tier.count_queued_hits(list(queued.values()))
        rest = [k for k in keys if k not in queued]
        return {**queued, **(self.tiers[index].get(rest) if rest else {})}


def _owned(page: KVPage) -> KVPage:
    """``page`` with a private copy of its bytes."""
    return dataclasses.replace(page, data=bytes(memoryview(page.data).cast("B")))
