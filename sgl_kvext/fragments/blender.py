"""Fragment reuse for a serving engine: plan which stored fragments a prompt can reuse, run the
blended prefill over them, and register new fragments in the background (torch only).

- :meth:`FragmentBlender.plan` (cheap, no tier I/O): after the cached prefix, the fragments
  of the prompt whose keys the index knows; the blend span runs to the prompt's last token.
  A span whose known fragments cover less than ``min_reuse_share`` of it is not worth
  blending.
  Fragments the index does not know are queued for registration: a marked one at once, an
  automatic one when it shows up at a second position (``SIGHTINGS``): an automatic chunk is
  worth its KV where its text moves; at the same position (a prompt sent again, a queued
  request planned on every scheduler pass) the prefix cache serves it. A prompt seen once is
  the common case on a general server, and registering each of its automatic chunks cost a
  30-layer forward apiece on the scheduler's cores and GIL (docs/reliability.md).
- :meth:`FragmentBlender.run`: fetch the fragments' KV from the store (fragments gone missing
  are simply recomputed in full) and run :func:`~sgl_kvext.blend.blended_prefill` after the
  prefix's KV, through the prompt's last token so that its first-token distribution is the
  one the engine will sample from; a close call (entropy above ``fallback_entropy``) is
  thrown away and the span computed exactly (:mod:`sgl_kvext.blend.close_call`). The result
  is approximate by design; the caller keeps it apart from exact KV.
- Registration (:mod:`.registration`) runs on one worker thread at the lowest CPU priority:
  a fragment some tier already holds (stored by another instance sharing the disk folder or
  S3 prefix, or before a restart) is only added to the index; otherwise it is computed on its
  own after the ``LEAD_TOKENS`` token before it in the text that registers it (a marked
  document's own first token, left out of its key by ``marked_core``), K at positions
  ``0..n-1``, and stored. A full queue drops work (counted) rather than blocking a request.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from sgl_kvext.blend import (
    DEFAULT_SETTINGS,
    BlendSettings,
    LayerOps,
    PrefixKV,
    ReusedChunk,
    blended_prefill,
    check_threshold,
    first_token_entropy,
)
from sgl_kvext.fragments.index import DroppedMark, FragmentIndex, FragmentMatch
from sgl_kvext.fragments.registration import FragmentRegistrar, Registration, token_ids_on
from sgl_kvext.fragments.report import BlendReport, BlendSeconds, Outcome
from sgl_kvext.fragments.store import FragmentStore
from sgl_kvext.pages.keys import Tenant
from sgl_kvext_kernels import RopeConfig

logger = logging.getLogger("sgl_kvext")
class BlendPlan(NamedTuple):
    """Blend tokens ``[start, end)``. Each fragment (absolute positions, the whole stored run)
    overlaps the span; only its part inside the span is reused. ``report`` so far."""

    start: int
    end: int
    fragments: tuple[FragmentMatch, ...]
    report: BlendReport

    @property
    def tokens(self) -> int:
        return self.end - self.start


class NoBlend(NamedTuple):
    """Nothing is blended; the report says why."""

    report: BlendReport


class BlendOutput(NamedTuple):
    """KV of the span, k / v [L, T, H, D], and the finished report."""

    k: torch.Tensor
    v: torch.Tensor
    report: BlendReport


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
    settings
        How the blended prefill chooses what to recompute (ratio, check layer, ...).
    min_reuse_share
        Least share of a span the known fragments must cover for a blend.
    queue_size
        Fragments from requests waiting for registration at most (more are dropped).
    prewarm_pending
        Pre-warm fragments waiting for registration at most: a pre-warm that would pass it
        raises :class:`PrewarmBusy` (one is always taken when none wait).
    max_text_tokens
        Longest pre-warm text (the model's context).
    fallback_entropy
        Blended first-token entropy (nats) above which the span is computed exactly instead
        (``inf``: never).
    """

    def __init__(self, ops: LayerOps, rope: RopeConfig, store: FragmentStore,
                 index: FragmentIndex, settings: BlendSettings = DEFAULT_SETTINGS,
                 min_reuse_share: float = 0.25, queue_size: int = 256,
                 prewarm_pending: int = 4096, max_text_tokens: int = 32768,
                 fallback_entropy: float = math.inf) -> None:
        if not 0.0 <= min_reuse_share <= 1.0:
            raise ValueError(f"min_reuse_share {min_reuse_share} must be in [0, 1]")
        self.fallback_entropy = check_threshold(fallback_entropy)
        self.ops, self.rope, self.store, self.index = ops, rope, store, index
        self.settings, self.min_reuse_share = settings, min_reuse_share
        self._lock = threading.Lock()
        self.counters = {"blends": 0, "fragment_hits": 0, "fragment_misses": 0,
                         "blended_tokens": 0, "recomputed_tokens": 0, "registered": 0,
                         "found_stored": 0, "register_dropped": 0, "register_failed": 0,
                         "seen_once": 0, "close_calls": 0}
        store.on_gone = lambda key: index.discard([key])    # registered again on next sight
        #: New fragments go here (plans queue what they find unknown; the pre-warm route).
        self.registrar = FragmentRegistrar(ops, rope, store, index, self.counters, self._lock,
                                           queue_size, prewarm_pending, max_text_tokens)
        self.max_text_tokens = max_text_tokens

    # ------------------------------------------------------------------ plan
    def plan(self, tenant: Tenant, tokens: Sequence[int] | np.ndarray, start: int,
             explicit: Sequence[tuple[int, int]] = (), page_size: int = 1
             ) -> BlendPlan | NoBlend:
        """The blend after ``start`` cached tokens, or why there is none.

        Unknown marked fragments are queued for registration, unknown automatic ones once
        seen at a second position.

        The span runs to the prompt's last token (the engine computes that one: it yields the
        logits), rounded down to ``page_size``: the tokens after the last fragment (the
        question) are computed inside the blend, where the choice of what to recompute can
        see what they attend to. Fragments are reused for their part inside the span, so a
        marked chunk whose head is in the cached prefix still gives the rest of its KV."""
        ids = np.asarray(tokens, dtype=np.int64)
        found = self.index.find(lambda t: self.store.key(tenant, t), ids, explicit, start)
        held = [self.index.known(m.key) for m in found.matches]
        self.registrar.enqueue(tenant, ids,
                               [m for m, h in zip(found.matches, held, strict=True) if not h])
        known = [m for m, h in zip(found.matches, held, strict=True) if h]
        dropped = [*found.dropped,
                   *(DroppedMark(m.start, m.end, "not stored yet (queued for registration)")
                     for m, h in zip(found.matches, held, strict=True) if m.marked and not h)]
        end = (ids.size - 1) // page_size * page_size

        used = tuple(m for m in known if max(m.start, start) < min(m.end, end))
        dropped += [DroppedMark(m.start, m.end, "after the span's page-aligned end")
                    for m in known if m.marked and m not in used]
        marked = [m for m in used if m.marked]
        report = BlendReport(
            Outcome.NOTHING_STORED, start, max(start, end), marked_used=len(marked),
            marked_partial=sum(m.start < start for m in marked),
            marked_in_prefix=found.marked_in_prefix, marked_dropped=tuple(dropped),
            auto_used=len(used) - len(marked))
        if not used:
            return NoBlend(report)
        covered = sum(min(m.end, end) - max(m.start, start) for m in used)
        if covered < self.min_reuse_share * (end - start):
            return NoBlend(report.but(outcome=Outcome.LITTLE_REUSE))
        return BlendPlan(start, end, used, report)

    def promote_missing(self, plan: BlendPlan) -> int:
        """How many of ``plan``'s fragments host memory (the tier :meth:`run` reads) lacks;
        each is being brought up from a lower tier in the background (one no tier holds is
        forgotten by the index, so the next plan leaves it out)."""
        keys = [m.key for m in plan.fragments]
        held = self.store.chain.tiers[0].exists(keys)
        for key, here in zip(keys, held, strict=True):
            if not here:
                self.store.promote(key)
        return held.count(False)

    # ------------------------------------------------------------------- run
    def run(self, tenant: Tenant, plan: BlendPlan, tokens: Sequence[int] | np.ndarray,
            prefix: PrefixKV) -> BlendOutput | NoBlend:
        """KV for ``tokens[plan.start:plan.end]`` after ``prefix`` (``plan.start`` tokens), or
        NoBlend when no fragment's KV could be fetched or the blended first token is a close
        call (the caller recomputes). The blend runs through the prompt's last token (the
        engine computes the tokens after ``plan.end`` again, over the span's KV)."""
        if len(prefix) != plan.start:
            raise ValueError(f"prefix holds {len(prefix)} tokens, the plan starts at "
                             f"{plan.start}")
        ids = token_ids_on(self.ops.device, tokens[plan.start:])
        whole = [token_ids_on(torch.device("cpu"), tokens[m.start:m.end]) for m in plan.fragments]
        fetch_started = time.perf_counter()
        found = self.store.get(tenant, whole, local_only=True)   # host memory only
        fetch_s = time.perf_counter() - fetch_started
        missing = len(plan.fragments) - len(found)
        with self._lock:
            self.counters["fragment_hits"] += len(found)
            self.counters["fragment_misses"] += missing
        if not found:
            return NoBlend(plan.report.but(outcome=Outcome.FRAGMENTS_MISSING,
                                           fragments_missing=missing))
        chunks = []
        for i, kv in sorted(found.items()):
            m = plan.fragments[i]
            a, b = max(m.start, plan.start), min(m.end, plan.end)
            chunks.append(ReusedChunk(a - plan.start, kv.part(a - m.start, b - m.start)))
        result = blended_prefill(self.ops, ids, chunks, self.rope, prefix=prefix,
                                 settings=self.settings)
        entropy = first_token_entropy(result.last_logits)
        report = plan.report.but(
            outcome=Outcome.BLENDED, fragments_missing=missing,
            reused_tokens=result.reused_tokens, first_token_entropy=entropy,
            recomputed_tokens=result.recomputed_tokens - (len(ids) - plan.tokens),
            seconds=BlendSeconds(0.0, fetch_s, *result.seconds))
        close_call = entropy > self.fallback_entropy
        with self._lock:
            self.counters["close_calls" if close_call else "blends"] += 1
            if not close_call:
                self.counters["blended_tokens"] += result.reused_tokens
                self.counters["recomputed_tokens"] += report.recomputed_tokens
        if close_call:
            return NoBlend(report.but(outcome=Outcome.CLOSE_CALL))
        return BlendOutput(result.k[:, :plan.tokens], result.v[:, :plan.tokens], report)

    def prewarm_async(self, tenant: Tenant, texts: Sequence[Sequence[int] | np.ndarray]
                      ) -> tuple[list[bytes], int]:
        """See :meth:`FragmentRegistrar.prewarm_async`."""
        return self.registrar.prewarm_async(tenant, texts)

    def registration(self, key: bytes) -> Registration:
        """See :meth:`FragmentRegistrar.registration`."""
        return self.registrar.registration(key)

    def close(self) -> None:
        self.registrar.close()
        self.store.close()
