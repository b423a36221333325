"""The tree's blend path: a blend-namespace request's span filled with blended KV.

The tree plans a blend at match time and, when SGLang admits the request, hands the plan here:
:meth:`BlendLoader.compute` reads the cached prefix's KV out of the pool and runs the blended
prefill over stored fragment KV (on the scheduler thread: it replaces a longer prefill of the
same span); :meth:`BlendLoader.write` puts the result into the slots the tree allocated. Every
outcome carries the request's :class:`~sgl_kvext.fragments.report.BlendReport`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Hashable, Sequence

import numpy as np
import torch

from sgl_kvext.blend import PrefixKV
from sgl_kvext.fragments.blender import BlendOutput, BlendPlan, FragmentBlender, NoBlend
from sgl_kvext.fragments.report import BlendReport, BlendSeconds, Outcome
from sgl_kvext.pages.cost_model import CostModel
from sgl_kvext.pages.keys import Tenant
from sgl_kvext.pages.kv_pages import PagedKV

#: Longest a blend-namespace request is held while its fragments come up from disk / S3.
FRAGMENT_WAIT_CAP_S = 5.0


class BlendLoader:
    """Blended prefill between the fragment store and SGLang's KV pool."""

    def __init__(self, blender: FragmentBlender, pool: PagedKV) -> None:
        self.blender, self.pool = blender, pool
        self._waits: dict[Hashable, float] = {}   # request -> hold deadline (monotonic)

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

    def forget(self, request: Hashable) -> None:
        """The request left: drop its hold deadline."""
        self._waits.pop(request, None)

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

    def write(self, slots: torch.Tensor, out: BlendOutput) -> BlendReport:
        """The blended span's KV into ``slots`` (one per span token); ``out``'s report with
        the write's time."""
        started = time.perf_counter()
        self.pool.write_tokens(slots, out.k, out.v)
        seconds = out.report.seconds or BlendSeconds()
        return out.report.but(seconds=dataclasses.replace(
            seconds, write=time.perf_counter() - started))
