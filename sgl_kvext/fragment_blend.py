"""Fragment reuse for a serving engine: plan which stored fragments a prompt can reuse, run the
blended prefill over them, and register new fragments in the background (torch only).

- :meth:`FragmentBlender.plan` (cheap, no tier I/O): after the cached prefix, the fragments
  of the prompt whose keys the index knows; the blend span ends at the last of them. A span
  whose known fragments cover less than ``min_reuse_share`` of it is not worth blending.
  Fragments the index does not know are queued for registration.
- :meth:`FragmentBlender.run`: fetch the fragments' KV from the store (fragments gone missing
  are simply recomputed in full) and run :func:`~sgl_kvext.blend.blended_prefill` after the
  prefix's KV. The result is approximate by design; the caller keeps it apart from exact KV.
- Registration runs on one worker thread: a fragment some tier already holds (stored by
  another instance sharing the disk folder or S3 prefix, or before a restart) is only added
  to the index; otherwise it is computed on its own (positions ``0..n-1``, nothing
  prepended) and stored. A full queue drops work (counted) rather than blocking a request.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import typing
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from sgl_kvext.blend import (
    LlamaLayerOps,
    PrefixKV,
    ReusedChunk,
    blended_prefill,
    compute_chunk_kv,
)
from sgl_kvext.fragment_index import FragmentIndex, FragmentMatch
from sgl_kvext.fragment_store import FragmentStore
from sgl_kvext_kernels import RopeConfig

logger = logging.getLogger("sgl_kvext")
_STOP = object()


class BlendPlan(NamedTuple):
    """Blend tokens ``[start, end)``; ``fragments`` (absolute positions) lie inside."""

    start: int
    end: int
    fragments: tuple[FragmentMatch, ...]

    @property
    def tokens(self) -> int:
        return self.end - self.start


class BlendOutput(NamedTuple):
    """KV of the span, k / v [L, T, H, D], and what the blend reused and recomputed."""

    k: torch.Tensor
    v: torch.Tensor
    reused_tokens: int
    recomputed_tokens: int


class FragmentBlender:
    """Plans, runs and registers fragment reuse for one model.

    Parameters
    ----------
    ops
        The model's layers (the serving engine's own modules).
    rope
        The model's RoPE, to re-rotate stored K.
    store, index
        Where fragment KV lives and which keys are known.
    ratio, check_layer
        CacheBlend recompute share and selection layer.
    min_reuse_share
        Least share of a span the known fragments must cover for a blend.
    queue_size
        Fragments waiting for registration at most.
    """

    def __init__(self, ops: LlamaLayerOps, rope: RopeConfig, store: FragmentStore,
                 index: FragmentIndex, ratio: float = 0.15, check_layer: int = 1,
                 min_reuse_share: float = 0.25, queue_size: int = 256) -> None:
        if not 0.0 <= min_reuse_share <= 1.0:
            raise ValueError(f"min_reuse_share {min_reuse_share} must be in [0, 1]")
        self.ops, self.rope, self.store, self.index = ops, rope, store, index
        self.ratio, self.check_layer, self.min_reuse_share = ratio, check_layer, min_reuse_share
        self._queue: queue.Queue[object] = queue.Queue(queue_size)
        self._queued: set[bytes] = set()
        self._lock = threading.Lock()
        self.counters = {"blends": 0, "fragment_hits": 0, "fragment_misses": 0,
                         "blended_tokens": 0, "recomputed_tokens": 0, "registered": 0,
                         "found_stored": 0, "register_dropped": 0, "register_failed": 0}
        self._worker = threading.Thread(target=self._register_loop, name="kvext-fragments",
                                        daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ plan
    def plan(self, salt: str, tokens: Sequence[int] | np.ndarray, start: int,
             explicit: Sequence[tuple[int, int]] = (), page_size: int = 1
             ) -> BlendPlan | None:
        """The blend after ``start`` cached tokens, or None when nothing is worth blending.

        The span ends at the last known fragment, rounded down to ``page_size``; at least one
        token of the prompt is always left for the engine (it computes the logits)."""
        ids = np.asarray(tokens, dtype=np.int64)
        matches = self.index.find(lambda t: self.store.key(salt, t), ids, explicit, start)
        known = [m for m in matches if m.end < ids.size and self.index.known(m.key)]
        self._enqueue(salt, ids, [m for m in matches if not self.index.known(m.key)])
        if not known:
            return None
        end = known[-1].end // page_size * page_size
        known = [m for m in known if m.end <= end]
        covered = sum(m.end - m.start for m in known)
        if end <= start or not known or covered < self.min_reuse_share * (end - start):
            return None
        return BlendPlan(start, end, tuple(known))

    # ------------------------------------------------------------------- run
    def run(self, salt: str, plan: BlendPlan, tokens: Sequence[int] | np.ndarray,
            prefix: PrefixKV) -> BlendOutput | None:
        """KV for ``tokens[plan.start:plan.end]`` after ``prefix`` (``plan.start`` tokens), or
        None when no fragment's KV could be fetched (the caller recomputes)."""
        if len(prefix) != plan.start:
            raise ValueError(f"prefix holds {len(prefix)} tokens, the plan starts at "
                             f"{plan.start}")
        ids = torch.as_tensor(np.asarray(tokens[plan.start:plan.end], dtype=np.int64))
        spans = [torch.as_tensor(np.asarray(tokens[m.start:m.end], dtype=np.int64))
                 for m in plan.fragments]
        found = self.store.get(salt, spans)
        for i, m in enumerate(plan.fragments):
            if i not in found:
                self.index.discard(m.key)
        with self._lock:
            self.counters["fragment_hits"] += len(found)
            self.counters["fragment_misses"] += len(plan.fragments) - len(found)
        if not found:
            return None
        chunks = [ReusedChunk(plan.fragments[i].start - plan.start, kv)
                  for i, kv in sorted(found.items())]
        result = blended_prefill(self.ops, ids, chunks, self.rope, prefix=prefix,
                                 ratio=self.ratio, check_layer=self.check_layer)
        with self._lock:
            self.counters["blends"] += 1
            self.counters["blended_tokens"] += result.reused_tokens
            self.counters["recomputed_tokens"] += result.recomputed_tokens
        return BlendOutput(result.k, result.v, result.reused_tokens, result.recomputed_tokens)

    # -------------------------------------------------------------- register
    def prewarm(self, salt: str, fragments: Sequence[Sequence[int] | np.ndarray]) -> int:
        """Compute and store each fragment now (a corpus loaded once); returns how many were
        stored (fragments of fewer than 2 tokens are skipped)."""
        stored = 0
        for tokens in fragments:
            ids = np.asarray(tokens, dtype=np.int64)
            if ids.size >= 2:
                self._register(salt, ids, self.store.key(salt, ids))
                stored += 1
        return stored

    def _enqueue(self, salt: str, ids: np.ndarray, matches: Sequence[FragmentMatch]) -> None:
        for m in matches:
            with self._lock:
                if m.key in self._queued:
                    continue
                self._queued.add(m.key)
            try:
                self._queue.put_nowait((salt, ids[m.start:m.end].copy(), m.key))
            except queue.Full:
                with self._lock:
                    self._queued.discard(m.key)
                    self.counters["register_dropped"] += 1

    def _register(self, salt: str, ids: np.ndarray, key: bytes) -> None:
        if self.store.exists(salt, [ids])[0]:
            self.index.add(key)
            with self._lock:
                self.counters["found_stored"] += 1
            return
        kv = compute_chunk_kv(self.ops, torch.as_tensor(ids))
        self.store.put(salt, kv)
        self.index.add(key)
        with self._lock:
            self.counters["registered"] += 1

    def _register_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            salt, ids, key = typing.cast(tuple[str, np.ndarray, bytes], item)
            try:
                self._register(salt, ids, key)
            except Exception:   # a failed registration only costs a future reuse
                logger.exception("sgl-kvext: registering a %d-token fragment failed", len(ids))
                with self._lock:
                    self.counters["register_failed"] += 1
            finally:
                with self._lock:
                    self._queued.discard(key)

    def drain(self, timeout_s: float = 60.0) -> bool:
        """Wait until queued registrations are done (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._queued:
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        try:
            self._queue.put(_STOP, timeout=5.0)
        except queue.Full:
            pass
        self._worker.join(timeout=30.0)
