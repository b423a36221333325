"""Tensor-parallel ranks agreeing on every admission decision.

Each TP rank runs its own scheduler, tree and tiers over its shard of the KV heads, and
SGLang's collectives assume every rank admitted the same tokens. The ranks' tiers can
disagree (a prefetch finished on one rank first, a host tier evicted a page on one), so
each decision is exchanged (one all-reduce MIN over SGLang's CPU group of the TP ranks) and
every rank takes the most conservative one:

- a :class:`Hold` anywhere holds everywhere (reporting the largest hit any rank holds for);
- otherwise every rank loads the shortest run any rank can (a :class:`Miss` counts as 0
  tokens), its own plan cut to that length (lengths are page-aligned on every rank, so their
  minimum is too);
- a load that did not complete on one rank (:class:`LoadOutcome`) fails on all: ``MOVED``
  (plan again) beats ``LOADED``, ``MISSING`` (recompute) beats both.

Invariant: every rank calls :meth:`RankAgreement.admission` and :meth:`RankAgreement.outcome`
the same number of times in the same order (SGLang's schedulers are deterministic; the tree
calls both on every path, failures included). With one rank (no group) both return their
input unchanged and talk to nobody.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from sgl_kvext.pages.plans import MISS, Hold, LoadOutcome, LoadPlan, Miss

_WORST_FIRST = (LoadOutcome.MISSING, LoadOutcome.MOVED, LoadOutcome.LOADED)


class RankAgreement:
    """Decisions agreed across a process group (``None``: a single rank).

    Parameters
    ----------
    group
        A ``torch.distributed`` group whose backend reduces CPU tensors (gloo: SGLang's
        ``tp_cache_group``).
    page_tokens
        Tokens per tier page (to cut a plan's pages to an agreed length).
    """

    def __init__(self, group: Any, page_tokens: int) -> None:
        self.group = group
        self.size = torch.distributed.get_world_size(group) if group is not None else 1
        self.page_tokens = page_tokens

    def _min(self, values: list[int]) -> list[int]:
        t = torch.tensor(values, dtype=torch.int64, device="cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.group)
        return [int(v) for v in t.tolist()]

    def admission(self, step: LoadPlan | Hold | Miss) -> LoadPlan | Hold | Miss:
        """The decision every rank takes, given this rank's ``step``."""
        if self.size == 1:
            return step
        hold = isinstance(step, Hold)
        tokens = step.tokens if isinstance(step, LoadPlan | Hold) else 0
        not_hold, load, neg_hit = self._min([0 if hold else 1, 0 if hold else tokens,
                                             -tokens])
        if not not_hold:
            return Hold(max(-neg_hit, 1))
        if load == 0 or not isinstance(step, LoadPlan):
            return MISS
        return self._cut(step, step.start + load)

    def outcome(self, outcome: LoadOutcome) -> LoadOutcome:
        """The load outcome every rank takes, given this rank's."""
        if self.size == 1:
            return outcome
        return _WORST_FIRST[self._min([_WORST_FIRST.index(outcome)])[0]]

    def _cut(self, plan: LoadPlan, end: int) -> LoadPlan:
        """``plan`` ending at ``end`` (<= ``plan.end``): the pages holding its tokens."""
        if end >= plan.end:
            return plan
        pages = -(-(end - plan.first_page * self.page_tokens) // self.page_tokens)
        return dataclasses.replace(plan, keys=plan.keys[:pages], tiers=plan.tiers[:pages],
                                   sources=plan.sources[:pages], end=end)
