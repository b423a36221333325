"""The tree's blend path: a blend-namespace request's span filled with blended KV.

At match time the tree asks :meth:`BlendLoader.plan` for the request's blend (the marked chunk
spans noted for it beside the request, :meth:`BlendLoader.note_chunk_spans`) and
:meth:`BlendLoader.hold` whether to keep it queued while fragments come up from disk / S3.
Then :meth:`BlendLoader.submit` runs the blend on the blend worker thread (reading the cached
prefix's KV out of the pool, blending stored fragment KV) while the request stays queued
(:mod:`.blend_jobs`); when SGLang admits it, :meth:`BlendLoader.write` puts the result into
slots the tree allocates. Every outcome goes into the request's response as its
:class:`~sgl_kvext.fragments.report.BlendReport` (``meta_info[REPORT_KEY]``).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import torch

from sgl_kvext.blend import PrefixKV
from sgl_kvext.fragments.blender import BlendOutput, BlendPlan, FragmentBlender, NoBlend
from sgl_kvext.fragments.report import BlendReport, BlendSeconds, Outcome
from sgl_kvext.pages.cost_model import CostModel
from sgl_kvext.pages.keys import Tenant
from sgl_kvext.pages.kv_pages import PagedKV
from sgl_kvext.sglang_plugin.load_report import put_info

logger = logging.getLogger("sgl_kvext")
#: Longest a blend-namespace request is held while its fragments come up from disk / S3.
FRAGMENT_WAIT_CAP_S = 5.0
#: The response's ``meta_info`` key holding ``[BlendReport.as_dict()]`` (SGLang's
#: ``customized_info`` channel: a list with one entry, sent with the first output token).
REPORT_KEY = "kvext_blend"
#: Requests whose marked chunk spans are remembered (finished ones are forgotten first).
_SPAN_REQUESTS = 4096


def report_on(req: Any, report: BlendReport) -> None:
    """Put ``report`` in the request's response (``meta_info[REPORT_KEY]``); the last one
    put before the first output token is the one the response carries."""
    put_info(req, REPORT_KEY, report.as_dict())


class BlendLoader:
    """Blended prefill between the fragment store and SGLang's KV pool."""

    def __init__(self, blender: FragmentBlender, pool: PagedKV) -> None:
        self.blender, self.pool = blender, pool
        self._waits: dict[Hashable, float] = {}   # request -> hold deadline (monotonic)
        self._spans: OrderedDict[Any, tuple[tuple[int, int], ...]] = OrderedDict()
        # One blend at a time (each is compute-bound), at the scheduler's priority: it is a
        # request's prefill. On CUDA its kernels run on a stream of their own.
        self._worker = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvext-blend")
        device = blender.ops.device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def note_chunk_spans(self, rid: Any, spans: Sequence[tuple[int, int]]) -> None:
        """Remember a request's marked chunks (prompt token spans) until it finishes."""
        self._spans[rid] = tuple(spans)
        while len(self._spans) > _SPAN_REQUESTS:
            self._spans.popitem(last=False)

    def plan(self, req: Any, tenant: Tenant, tokens: Sequence[int], device_len: int,
             page_size: int) -> BlendPlan | None:
        """The blend of ``req``'s prompt after its ``device_len`` cached tokens, or None
        (nothing to blend, or the lookup failed: the prompt is computed in full); the
        report goes on the request either way."""
        try:
            blend = self.blender.plan(tenant, tokens, device_len,
                                      self._spans.get(req.rid, ()), page_size)
        except Exception:
            logger.exception("sgl-kvext: fragment lookup failed; computing the prompt in full")
            blend = NoBlend(BlendReport(Outcome.FAILED, device_len, device_len))
        report_on(req, blend.report)
        return blend if isinstance(blend, BlendPlan) else None

    def hold(self, request: Hashable, plan: BlendPlan, cost: CostModel,
             bytes_per_token: float) -> bool:
        """Whether to keep ``request`` queued while fragments of ``plan`` come up into host
        memory, the only tier a blend reads (a marked document evicted there would otherwise
        run unblended), within a budget fixed at its first pass: only while loading is
        expected to beat recomputing the span, at most :data:`FRAGMENT_WAIT_CAP_S`."""
        if not self.blender.promote_missing(plan):
            self._waits.pop(request, None)
            return False
        until = self._waits.get(request)
        if until is None:
            budget = cost.hold_budget_s(plan.tokens, bytes_per_token, FRAGMENT_WAIT_CAP_S)
            until = self._waits[request] = time.monotonic() + budget
        return time.monotonic() < until

    def forget(self, request: Hashable, rid: Any = None) -> None:
        """The request left (``rid``: it finished, so its chunk spans go too)."""
        self._waits.pop(request, None)
        if rid is not None:
            self._spans.pop(rid, None)

    def submit(self, tenant: Tenant, plan: BlendPlan, tokens: Sequence[int] | np.ndarray,
               prefix_slots: torch.Tensor) -> cf.Future[BlendOutput | NoBlend]:
        """Run :meth:`compute` on the blend worker. The caller keeps ``prefix_slots`` from
        being reused until the future is done; a failing blend resolves to a ``FAILED``
        NoBlend (the span is then computed as usual), never to an exception."""
        ready = None
        if self._stream is not None:        # the prefix's KV is written on the caller's stream
            ready = torch.cuda.Event()
            ready.record()

        def run() -> BlendOutput | NoBlend:
            try:
                if self._stream is None:
                    return self.compute(tenant, plan, tokens, prefix_slots)
                with torch.cuda.stream(self._stream):
                    assert ready is not None
                    self._stream.wait_event(ready)
                    out = self.compute(tenant, plan, tokens, prefix_slots)
                    self._stream.synchronize()  # done before the scheduler writes it
                    return out
            except Exception:
                logger.exception("sgl-kvext: blending %d tokens failed; computing them",
                                 plan.tokens)
                return NoBlend(plan.report.but(outcome=Outcome.FAILED))

        return self._worker.submit(run)

    def write(self, req: Any, out: BlendOutput | NoBlend,
              alloc: Callable[[int], torch.Tensor | None],
              free: Callable[[torch.Tensor], None]) -> torch.Tensor | None:
        """Slots (from ``alloc``) holding ``out``'s KV, or None: nothing blended, the span is
        computed as usual (the request's report says why). Never raises."""
        report_on(req, out.report)
        if isinstance(out, NoBlend):
            return None
        slots = alloc(int(out.k.shape[1]))
        if slots is None:
            report_on(req, out.report.but(outcome=Outcome.DECLINED))
            return None
        try:
            started = time.perf_counter()
            self.pool.write_tokens(slots, out.k, out.v)
        except Exception:
            logger.exception("sgl-kvext: writing %d blended tokens failed; computing them",
                             int(slots.numel()))
            report_on(req, out.report.but(outcome=Outcome.FAILED))
            free(slots)
            return None
        seconds = out.report.seconds or BlendSeconds()
        report_on(req, out.report.but(seconds=dataclasses.replace(
            seconds, write=time.perf_counter() - started)))
        return slots

    def compute(self, tenant: Tenant, plan: BlendPlan, tokens: Sequence[int] | np.ndarray,
                prefix_slots: torch.Tensor) -> BlendOutput | NoBlend:
        """KV of ``plan``'s span after the prefix held in ``prefix_slots`` (``plan.start``
        of them; otherwise the tree changed since the plan and nothing is blended)."""
        if prefix_slots.numel() != plan.start:
            return NoBlend(plan.report.but(outcome=Outcome.DECLINED))
        started = time.perf_counter()
        prefix = PrefixKV(*self.pool.read_tokens(prefix_slots))
        prefix_s = time.perf_counter() - started
        out = self.blender.run(tenant, plan, tokens, prefix)
        if isinstance(out, NoBlend) or out.report.seconds is None:
            return out
        return out._replace(report=out.report.but(
            seconds=dataclasses.replace(out.report.seconds, prefix=prefix_s)))

    def close(self) -> None:
        """Stop the blend worker (a running blend finishes unread)."""
        self._worker.shutdown(wait=False, cancel_futures=True)
