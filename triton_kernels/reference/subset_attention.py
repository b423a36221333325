"""Pure-torch subset attention (the oracle and the CPU path).

Keys and queries are put in position order (a no-op when they already are); queries then go in
blocks of ``_BLOCK_Q``, and a block attends only to the key prefix its largest position can see,
so the work is about the causal triangle rather than the full ``n_q x n_kv`` rectangle. Each
block is one ``scaled_dot_product_attention`` call with a boolean position mask, in float32, with
grouped-query heads expanded by SDPA (the same arithmetic as ``repeat_interleave`` on KV heads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_BLOCK_Q = 64  # measured on 2 CPU cores: 64 is ~3.7x faster than one unblocked masked call


def _in_order(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(positions ascending, the permutation that sorts them or None when already sorted)."""
    if positions.shape[0] < 2 or bool((positions[1:] >= positions[:-1]).all()):
        return positions, None
    order = torch.argsort(positions, stable=True)
    return positions[order], order


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
    head_dim_v = v.shape[2]
    if out is None:
        out = q.new_empty((n_q, n_q_heads, head_dim_v))
    if n_q == 0:
        return out

    kv_pos, kv_order = _in_order(kv_positions.long())
    kf = (k if kv_order is None else k[kv_order]).float().transpose(0, 1)  # [H, n_kv, D]
    vf = (v if kv_order is None else v[kv_order]).float().transpose(0, 1)  # [H, n_kv, Dv]
    q_pos, q_order = _in_order(q_positions.long())
    qs = q if q_order is None else q[q_order]
    result = torch.zeros((n_q, n_q_heads, head_dim_v), dtype=torch.float32, device=q.device)
    for lo in range(0, n_q, _BLOCK_Q):
        hi = min(n_q, lo + _BLOCK_Q)
        # Keys are ascending: the block's last (largest) position bounds the visible prefix.
        n = int(torch.searchsorted(kv_pos, q_pos[hi - 1], right=True))
        if n == 0:
            continue                     # no query of the block sees a key: zero rows
        visible = kv_pos[None, :n] <= q_pos[lo:hi, None]  # [c, n]
        o = F.scaled_dot_product_attention(
            qs[lo:hi].float().transpose(0, 1), kf[:, :n], vf[:, :n], attn_mask=visible,
            scale=scale, enable_gqa=True).transpose(0, 1)
        # A row with no visible key is NaN from the softmax: those queries get zeros.
        result[lo:hi] = o.masked_fill(~visible.any(dim=-1)[:, None, None], 0.0)
    if q_order is not None:
        result = torch.empty_like(result).index_copy_(0, q_order, result)
    out.copy_(result)
    return out
