"""Registering new fragments in the background: a worker thread at the lowest CPU priority
computes each queued fragment's KV on its own and stores it (or only indexes it when some tier
holds it already), so a later prompt that moves the text can blend it.

:class:`FragmentRegistrar` serves the :class:`~sgl_kvext.fragments.blender.FragmentBlender`:
its plans queue what they found unknown (:meth:`FragmentRegistrar.enqueue`), the pre-warm
route queues whole texts (:meth:`FragmentRegistrar.prewarm_async`) and asks where each stands
(:meth:`FragmentRegistrar.registration`). Counters and their lock are the blender's.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import typing
from collections import OrderedDict
from collections.abc import Sequence
from enum import Enum

import numpy as np
import torch

from sgl_kvext.blend import LayerOps, compute_chunk_kv
from sgl_kvext.fragments.chunking import fragments
from sgl_kvext.fragments.index import FragmentIndex, FragmentMatch, marked_core
from sgl_kvext.fragments.store import FragmentStore
from sgl_kvext.pages.keys import Tenant
from sgl_kvext.pages.recent_keys import RecentKeys
from sgl_kvext_kernels import RopeConfig

logger = logging.getLogger("sgl_kvext")
_STOP = object()
#: How a :class:`PrewarmBusy` message starts (the HTTP route answers 429 on it).
PREWARM_BUSY = "the pre-warm queue is full"
#: Automatic fragments seen at one position only, remembered with it (oldest forgotten
#: first): seen at another position, one is queued for registration.
SIGHTINGS = 1 << 16
#: Tokens before a fragment computed with it and dropped: a marked document's own first token
#: (its key leaves it out), so the fragment's KV is the document's as computed alone, as
#: CacheBlend computes a chunk. On 200 prose questions the gain over none is below noise
#: (docs/cacheblend.md, "The server's conventions").
LEAD_TOKENS = 1


class PrewarmBusy(RuntimeError):
    """Too many pre-warm fragments wait for registration: try again in a moment."""


def _lower_priority() -> None:
    """Give the calling thread (and the math threads it starts) the lowest CPU priority.

    Registration computes whole fragments on the CPU the scheduler serves from; at equal
    priority it halved serving's matmul speed on a 2-core machine; at nice 19 it takes the
    cycles serving leaves idle. Threads it starts later (its math pool) inherit the value."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:         # not permitted here: registration runs at normal priority
        logger.warning("sgl-kvext: could not lower the fragment registration priority")


class Registration(Enum):
    """Where a pre-warmed fragment stands (``/kvext/fragments`` answers one per key)."""

    REGISTERED = "registered"   # in the index: requests reuse it
    PENDING = "pending"         # queued or being computed and stored
    FAILED = "failed"           # its last write was refused or timed out: pre-warm it again
    UNKNOWN = "unknown"         # never sent, or forgotten (evicted, corrupt)


#: Failed registrations remembered for ``registration`` (oldest forgotten first).
MAX_FAILED = 4096


class FragmentRegistrar:
    """The registration queue and its worker thread for one blender (see the module doc).

    ``queue_size``: fragments from requests waiting at most (more are dropped);
    ``prewarm_pending``: pre-warm fragments waiting at most (a pre-warm that would pass it
    raises :class:`PrewarmBusy`; one is always taken when none wait); ``max_text_tokens``:
    the longest pre-warm text (the model's context)."""

    def __init__(self, ops: LayerOps, rope: RopeConfig, store: FragmentStore,
                 index: FragmentIndex, counters: dict[str, int], lock: threading.Lock,
                 queue_size: int = 256, prewarm_pending: int = 4096,
                 max_text_tokens: int = 32768) -> None:
        self.ops, self.rope, self.store, self.index = ops, rope, store, index
        self.counters, self._lock = counters, lock
        self.queue_size, self.prewarm_pending = queue_size, prewarm_pending
        self.max_text_tokens = max_text_tokens
        self._pending_prewarm = 0
        self._queue: queue.Queue[object] = queue.Queue()   # bounded by enqueue, see there
        self._queued: set[bytes] = set()
        self._failed = RecentKeys(MAX_FAILED)
        self._seen: OrderedDict[bytes, int] = OrderedDict()   # key -> the position seen at
        self._worker = threading.Thread(target=self._register_loop, name="kvext-fragments",
                                        daemon=True)
        self._worker.start()

    @property
    def busy(self) -> bool:
        """Some fragment is queued or being registered."""
        with self._lock:
            return bool(self._queued)

    def prewarm_async(self, tenant: Tenant, texts: Sequence[Sequence[int] | np.ndarray]
                      ) -> tuple[list[bytes], int]:
        """Queue each text's marked core (``marked_core``: what a request marking the text
        reuses) as a fragment, plus its automatic fragments when the index chunks
        automatically; returns (every key, how many were queued). Pre-warm items are never
        dropped, and each is written through the whole tier chain before it counts as known
        (so another instance sharing the tiers finds it)."""
        try:
            arrays = [np.asarray(text, dtype=np.int64) for text in texts]
        except (TypeError, ValueError, OverflowError):
            raise ValueError("token ids must be integers") from None
        work = []
        for ids in arrays:
            if ids.ndim != 1 or ids.size > self.max_text_tokens:
                raise ValueError(f"a text must be at most {self.max_text_tokens} tokens")
            spans = [(1, int(ids.size) - 1)] if marked_core(ids).size else []
            if self.index.chunking != "explicit":
                spans += [(f.start, f.end) for f in fragments(ids, self.index.min_tokens)
                          if (f.start, f.end) != (1, int(ids.size) - 1)]
            work += [(ids, start, end) for start, end in spans]
        with self._lock:
            waiting = self._pending_prewarm
        if waiting and waiting + len(work) > self.prewarm_pending:
            raise PrewarmBusy(f"{PREWARM_BUSY}: {waiting} fragments wait for registration "
                              f"(at most {self.prewarm_pending}); retry in a moment")
        keys: list[bytes] = []
        queued = 0
        for ids, start, end in work:
            key = self.store.key(tenant, ids[start:end])
            keys.append(key)
            queued += self._put(tenant, ids, start, end, key, durable=True)
        return keys, queued

    def enqueue(self, tenant: Tenant, ids: np.ndarray, matches: Sequence[FragmentMatch]) -> None:
        """Queue what a plan found unknown: marked fragments at once, automatic ones seen at a
        second position; a full queue drops (counted), never blocks."""
        for m in matches:
            if not m.marked and self._one_position(m.key, m.start):
                continue
            if self._queue.qsize() >= self.queue_size:
                with self._lock:
                    self.counters["register_dropped"] += 1
                continue
            self._put(tenant, ids, m.start, m.end, m.key, durable=False)

    def _one_position(self, key: bytes, start: int) -> bool:
        """Whether ``key`` has been seen at ``start`` only (remembered there if so)."""
        with self._lock:
            first = self._seen.get(key)
            if first is None:
                self._seen[key] = start
                if len(self._seen) > SIGHTINGS:
                    self._seen.popitem(last=False)
                self.counters["seen_once"] += 1
                return True
            if first == start:
                return True
            del self._seen[key]
            return False

    def _put(self, tenant: Tenant, text: np.ndarray, start: int, end: int, key: bytes,
             durable: bool) -> int:
        """Queue ``text[start:end]`` (with its lead tokens) for registration under ``key``."""
        with self._lock:
            if key in self._queued or self.index.known(key):
                return 0
            self._queued.add(key)
            self._failed.discard((key,))
            self._pending_prewarm += durable
        lead = text[max(0, start - LEAD_TOKENS):start].copy()
        self._queue.put((tenant, text[start:end].copy(), lead, key, durable))
        return 1

    def _register(self, tenant: Tenant, ids: np.ndarray, lead: np.ndarray, key: bytes,
                  durable: bool) -> None:
        # Stored already (by us earlier, or another instance): bring it up to host memory
        # here, on the worker thread, where the scheduler's reads find it. A durable (pre-warm)
        # registration also needs it in the last tier, which other instances read: a copy
        # only in host memory (its write down failed before) is written through again.
        last = self.store.chain.tiers[-1]
        kv = self.store.get(tenant, [ids]).get(0)
        if kv is not None and (not durable or last.exists([key])[0]):
            self.index.add(key)
            with self._lock:
                self.counters["found_stored"] += 1
            return
        dev = self.ops.device
        if kv is None:
            kv = compute_chunk_kv(self.ops, token_ids_on(dev, ids), token_ids_on(dev, lead),
                                  self.rope)
        self.store.put(tenant, kv)
        if durable and not (self.store.chain.flush(timeout_s=120.0) and last.exists([key])[0]):
            # Not in the last tier (a write timed out or was refused): not known, so other
            # instances are not promised it and a later pre-warm tries again.
            self._fail(key)
            return
        self.index.add(key)
        with self._lock:
            self.counters["registered"] += 1

    def _register_loop(self) -> None:
        _lower_priority()
        # On CUDA, registration's prefills run on a stream of their own: on the legacy default
        # stream every kernel would wait for, and hold up, the scheduler's streams.
        if self.ops.device.type == "cuda":
            with torch.cuda.stream(torch.cuda.Stream(self.ops.device)):
                self._drain()
        else:
            self._drain()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            tenant, ids, lead, key, durable = typing.cast(
                tuple[Tenant, np.ndarray, np.ndarray, bytes, bool], item)
            try:
                self._register(tenant, ids, lead, key, durable)
            except Exception:   # a failed registration only costs a future reuse
                logger.exception("sgl-kvext: registering a %d-token fragment failed", len(ids))
                self._fail(key)
            finally:
                with self._lock:
                    self._queued.discard(key)
                    self._pending_prewarm -= durable

    def _fail(self, key: bytes) -> None:
        self._failed.add((key,))
        with self._lock:
            self.counters["register_failed"] += 1

    def registration(self, key: bytes) -> Registration:
        """Where the fragment ``key`` stands (see :class:`Registration`)."""
        with self._lock:
            if key in self._queued:
                return Registration.PENDING
            if self._failed.seen(key):
                return Registration.FAILED
        return Registration.REGISTERED if self.index.known(key) else Registration.UNKNOWN

    def close(self) -> None:
        self._queue.put(_STOP)
        self._worker.join(timeout=30.0)


def token_ids_on(device: torch.device, tokens: Sequence[int] | np.ndarray) -> torch.Tensor:
    """Token ids as an int64 tensor on ``device`` (never on torch's default device)."""
    return torch.from_numpy(np.asarray(tokens, dtype=np.int64).copy()).to(device)
