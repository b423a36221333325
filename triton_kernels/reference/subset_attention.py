"""Pure-torch subset attention (the oracle and the CPU path).

Queries are processed in chunks so the float32 score tensor stays bounded: a chunk holds at most
``_SCORE_BUDGET`` scores (``n_q_heads * chunk * n_kv``) and at most ``_MAX_CHUNK`` queries.
Grouped-query heads are handled by a view (``[n_kv_heads, group, ...]``), not by copying K / V
``group`` times, which is the same arithmetic as ``repeat_interleave`` on the KV heads.
"""

from __future__ import annotations

import torch

_MAX_CHUNK = 256
_SCORE_BUDGET = 1 << 24  # float32 scores per chunk: 64 MiB


def subset_attention_ref(
    q: torch.Tensor,
    q_positions: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_positions: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked softmax attention in float32; shapes as in :func:`subset_attention`.

    Key ``j`` is visible to query ``i`` iff ``kv_positions[j] <= q_positions[i]``; a query that
    sees no key gets a zero row. The result has ``q``'s dtype (written to ``out`` if given).
    """
    n_q, n_q_heads, _ = q.shape
    n_kv, n_kv_heads, head_dim_v = v.shape
    group = n_q_heads // n_kv_heads
    if out is None:
        out = q.new_empty((n_q, n_q_heads, head_dim_v))
    if n_q == 0:
        return out

    kf = k.float().permute(1, 2, 0)  # [n_kv_heads, head_dim, n_kv]
    vf = v.float().permute(1, 0, 2)  # [n_kv_heads, n_kv, head_dim_v]
    kv_pos = kv_positions.long()
    chunk = max(1, min(_MAX_CHUNK, _SCORE_BUDGET // max(1, n_q_heads * n_kv)))
    for lo in range(0, n_q, chunk):
        hi = min(n_q, lo + chunk)
        c = hi - lo
        # [c, n_q_heads, d] -> [n_kv_heads, group * c, d]; query head h = kv_head * group + g.
        qf = q[lo:hi].float().reshape(c, n_kv_heads, group, -1).permute(1, 2, 0, 3)
        qf = qf.reshape(n_kv_heads, group * c, -1)
        scores = torch.bmm(qf, kf).mul_(scale).view(n_kv_heads, group, c, n_kv)
        visible = kv_pos[None, :] <= q_positions[lo:hi].long()[:, None]  # [c, n_kv]
        scores.masked_fill_(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        # softmax over an all -inf row is NaN: those queries see no key and get zeros.
        probs.masked_fill_(~visible.any(dim=-1)[:, None], 0.0)
        o = torch.bmm(probs.view(n_kv_heads, group * c, n_kv), vf)  # [n_kv_heads, g*c, dv]
        o = o.view(n_kv_heads, group, c, head_dim_v).permute(2, 0, 1, 3)
        out[lo:hi] = o.reshape(c, n_q_heads, head_dim_v)
    return out
