"""Which reused tokens a blended prefill recomputes: the settings and the choice.

Plain CacheBlend ranks every reused token by how far its fresh K at the check layer is from
its re-rotated cached K and recomputes the top ``ratio``. :class:`BlendSettings` adds what
the quality sweep (docs/cacheblend.md) tried beside it, each off in ``BlendSettings()``
(plain CacheBlend); :data:`DEFAULT_SETTINGS`, what the server uses unless configured, turns
on what won (``query_share`` 0.5 and ``check_layer`` 6):

- ``spread="chunk"``: the budget is split over the chunks by length, top deviation within
  each (plain: one ranking over the whole prompt); ``spread="attention"``: split by the
  attention the prompt's tail (the question) pays each chunk at the check layer;
- ``query_share``: that share of the budget goes to the reused tokens the prompt's tail (the
  tokens after the last reused chunk: the question) attends to most at the check layer;
- ``sink_tokens``: each chunk's first tokens are always recomputed (EPIC; computed alone,
  a chunk's first token is an attention sink);
- ``gradual``: the check layer selects ``gradual`` times the budget and the next
  ``narrow_layers`` layers narrow it to the budget by their own K deviation (the CacheBlend
  paper's gradual filtering).

Every count is taken from the budget ``ceil(ratio * reused)``, so settings compare at equal
recompute cost (``gradual`` spends more on its narrowing layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SPREADS = ("prompt", "chunk", "attention")


@dataclass(frozen=True, slots=True)
class BlendSettings:
    """How a blended prefill chooses the reused tokens it recomputes (see the module doc)."""

    ratio: float = 0.15
    check_layer: int = 1
    spread: str = "prompt"
    query_share: float = 0.0
    sink_tokens: int = 0
    gradual: float = 1.0
    narrow_layers: int = 2
    min_tokens: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"ratio {self.ratio} must be in [0, 1]")
        if self.check_layer < 0 or self.min_tokens < 0 or self.sink_tokens < 0:
            raise ValueError("check_layer, min_tokens and sink_tokens must be >= 0")
        if self.spread not in SPREADS:
            raise ValueError(f"spread {self.spread!r}: allowed {', '.join(SPREADS)}")
        if not 0.0 <= self.query_share <= 1.0:
            raise ValueError(f"query_share {self.query_share} must be in [0, 1]")
        if self.gradual < 1.0 or self.narrow_layers < 1:
            raise ValueError("gradual must be >= 1 and narrow_layers >= 1")

    @property
    def needs_attention(self) -> bool:
        """The choice reads what the prompt's tail attends to at the check layer."""
        return self.query_share > 0 or self.spread == "attention"

    def budget(self, reused: int) -> int:
        """Reused tokens recomputed after narrowing: ``ceil(ratio * reused)``, at least
        ``min_tokens`` (at most ``reused``)."""
        k = math.ceil(self.ratio * reused - 1e-6)
        return min(reused, max(k, self.min_tokens))

    def narrowed(self, reused: int, layers_after_check: int) -> int:
        """How many reused tokens stay active ``layers_after_check`` layers after the check
        layer (0 = at the check layer): from ``gradual`` times the budget down to the budget
        over ``narrow_layers`` layers, linearly."""
        final = self.budget(reused)
        first = min(reused, math.ceil(final * self.gradual))
        step = min(layers_after_check, self.narrow_layers) / self.narrow_layers
        return max(final, round(first - (first - final) * step))


#: The default: ratio 0.15, selection at layer 6, half the budget for the tokens the question
#: attends to most. The best answers measured (docs/cacheblend.md, 200 questions per corpus,
#: float32: +9.0 ± 2.7 points over plain CacheBlend, ``BlendSettings()``, on prose and +9.5
#: ± 2.1 on the synthetic set; +3.5 ± 1.5 and +1.5 ± 1.5 over the same share at layer 4)
#: for ~1.13x the TTFT of layer 4 (layer 4 beat layer 1 the same way the day before).
DEFAULT_SETTINGS = BlendSettings(check_layer=6, query_share=0.5)


def tail_attention(q: torch.Tensor, k: torch.Tensor, queries: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Mean attention weight the ``queries`` rows pay to every key: q [T, Hq, D] and k
    [T, H, D] of one layer (grouped heads), ``queries`` [S] row indices, every key before or
    at each query -> [T] float32 (0 for keys after a query)."""
    group = q.shape[1] // k.shape[1]
    qs = q[queries].float().transpose(0, 1)                       # [Hq, S, D]
    ks = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, T, D]
    scores = qs @ ks.transpose(1, 2) * scale                       # [Hq, S, T]
    future = torch.arange(k.shape[0], device=k.device).unsqueeze(0) > queries.unsqueeze(1)
    scores.masked_fill_(future.unsqueeze(0), float("-inf"))
    return torch.softmax(scores, dim=-1).mean(dim=(0, 1))


def top_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores (NaN first: a corrupt entry is recomputed)."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.int64, device=score.device)
    score = torch.nan_to_num(score.float(), nan=float("inf"))
    return torch.topk(score, min(k, score.numel())).indices


def choose(settings: BlendSettings, deviation: torch.Tensor, chunk_of: torch.Tensor,
           is_sink: torch.Tensor, attention: torch.Tensor | None, count: int) -> torch.Tensor:
    """``count`` of the reused tokens to recompute, as indices into them.

    Parameters
    ----------
    deviation : [R]
        Check-layer K deviation of each reused token.
    chunk_of : [R] int64
        The chunk each reused token belongs to.
    is_sink : [R] bool
        The token is one of its chunk's first ``sink_tokens``.
    attention : [R] or None
        What the prompt's tail pays each token (``needs_attention`` settings need it;
        without it ``spread="attention"`` splits by length).
    """
    n = deviation.numel()
    taken = torch.zeros(n, dtype=torch.bool, device=deviation.device)
    taken[is_sink] = True
    left = count - int(taken.sum())
    if attention is not None and settings.query_share > 0 and left > 0:
        by_attention = attention.clone()
        by_attention[taken] = float("-inf")
        taken[top_indices(by_attention, round(left * settings.query_share))] = True
        left = count - int(taken.sum())
    if left > 0:
        score = deviation.float().clone()
        score[taken] = float("-inf")
        if settings.spread == "prompt":
            taken[top_indices(score, left)] = True
        else:
            chunks = torch.unique(chunk_of)
            slot = torch.searchsorted(chunks, chunk_of)
            room = torch.zeros(chunks.numel(), device=deviation.device).index_add_(
                0, slot, (~taken).float())
            weight = room
            if settings.spread == "attention" and attention is not None:
                weight = torch.zeros(chunks.numel(), device=deviation.device).index_add_(
                    0, slot, attention.float())
            quota = split(weight, room, left)
            for chunk, q in zip(chunks.tolist(), quota.tolist(), strict=True):
                rows = (chunk_of == chunk).nonzero().flatten()
                taken[rows[top_indices(score[rows], q)]] = True
    return taken.nonzero().flatten()


def split(weight: torch.Tensor, room: torch.Tensor, total: int) -> torch.Tensor:
    """``total`` (at most ``room.sum()``) split over slots in proportion to ``weight`` (>= 0;
    all 0: in proportion to ``room``), no slot over its ``room``: a full slot's excess goes
    to the others by the same proportion, remainders to the largest fractions. -> int64."""
    weight = weight.float().clamp(min=0)
    room = room.float()
    total = min(total, int(room.sum()))
    share = torch.zeros_like(room)
    for _ in range(room.numel() + 1):               # each round fills at least one slot
        left = total - float(share.sum())
        open_ = share < room
        if left < 1e-6 or not bool(open_.any()):
            break
        w = torch.where(open_, weight, torch.zeros_like(weight))
        if float(w.sum()) <= 0:
            w = torch.where(open_, room - share, torch.zeros_like(room))
        share = torch.minimum(share + w / w.sum() * left, room)
    quota = share.floor().long()
    quota[top_indices(share - quota, total - int(quota.sum()))] += 1
    return quota
