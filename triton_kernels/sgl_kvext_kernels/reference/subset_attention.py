"""Pure-torch subset attention (the oracle and the CPU path).

General case: keys and queries are put in position order (a no-op when they already are);
queries then go in blocks of ``_BLOCK_Q``, and a block attends only to the key prefix its
largest position can see, so the work is about the causal triangle rather than the full
``n_q x n_kv`` rectangle. On CPU each block is one fused flash-attention call in the inputs'
dtype (float32 accumulation inside) with an additive position mask: 5-6x faster than
the float32 math path at 600 of 4,000 queries in bf16 (2 cores; outputs equal up to the last
bit of bf16). Elsewhere each block is one ``scaled_dot_product_attention`` call with a boolean
mask in float32, grouped-query heads expanded by SDPA (the same arithmetic as
``repeat_interleave`` on KV heads).

Suffix case: when the keys hold consecutive positions and the queries are the last ``n`` of
them, in order (an extend over a cached prefix, a decode step, a cold prefill), attention is
split into the queries over the ``p`` prefix keys (no mask) and over their own ``n`` keys
(causal), each one fused CPU flash-attention call in the inputs' dtype, merged by log-sum-exp:
exactly the triangle's work, measured 1.2-1.5x faster than the blocks at 2k-4k tokens. Up to
:data:`ONE_CALL_KEYS` keys (and a mask of at most 2M elements) the pieces are put end to end
instead and the queries take one call with the causal mask on their own block: the second call
and the merge cost more than copying that many keys.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

_BLOCK_Q = 64  # measured on 2 CPU cores: 64 is ~3.7x faster than one unblocked masked call
#: Up to this many keys in all, several queries over pieces and their own keys take one call
#: over the keys put end to end (2 cores with AMX, bf16, median of 60 interleaved: 45 queries
#: over 945 keys 0.80 ms a layer against 1.31 split and merged, 55 over 2,000 1.12 against
#: 1.26; over 3,000 the copy outgrows L2 and the split wins, 1.81 against 2.59).
ONE_CALL_KEYS = 2048
#: ... and while its mask (a row per query and query head group, a column per key) stays this
#: small: a long extend's mask would cost memory (it is kept for the forward's other layers)
#: for a gain that is there only at a few hundred queries.
_ONE_CALL_MASK_ELEMENTS = 1 << 21
# (out, logsumexp) = op(q, k, v, dropout_p, is_causal, *, attn_mask, scale); [B, H, L, D] in.
_FLASH_CPU: Any = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _in_order(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(positions ascending, the permutation that sorts them or None when already sorted)."""
    if positions.shape[0] < 2 or bool((positions[1:] >= positions[:-1]).all()):
        return positions, None
    order = torch.argsort(positions, stable=True)
    return positions[order], order


def _is_suffix(q_positions: torch.Tensor, kv_positions: torch.Tensor) -> bool:
    """Keys at consecutive ascending positions, queries the last ``n_q`` of them in order."""
    n_q, n_kv = q_positions.shape[0], kv_positions.shape[0]
    if _FLASH_CPU is None or n_q > n_kv or q_positions.device.type != "cpu":
        return False
    steps = torch.arange(n_kv, device=kv_positions.device)
    return (bool(torch.equal(kv_positions.long() - int(kv_positions[0]), steps))
            and bool(torch.equal(q_positions.long(), kv_positions[n_kv - n_q:].long())))


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
           scale: float, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out ``[n, H, Dv]`` float32, logsumexp ``[n, H]``) of ``q`` ``[n, H, D]`` over ``k`` /
    ``v`` ``[m, KVH, D]``; a causal call aligns query ``i`` with key ``i``. Query groups fold
    into one longer query per KV head when not causal, so KV is not copied per query head; an
    additive ``mask`` then has a row per folded query (:func:`_own_block_mask`)."""
    n, heads, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    kh, vh = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
    if causal or group == 1:
        if group > 1:
            kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
        qh = q.transpose(0, 1).unsqueeze(0)
        o, lse = _FLASH_CPU(qh, kh, vh, 0.0, causal, attn_mask=mask, scale=scale)
        return o[0].transpose(0, 1).float(), lse[0].transpose(0, 1)
    qg = q.reshape(n, kv_heads, group, dim).permute(1, 2, 0, 3).reshape(1, kv_heads, -1, dim)
    o, lse = _FLASH_CPU(qg, kh, vh, 0.0, False, attn_mask=mask, scale=scale)
    o = o.reshape(kv_heads, group, n, -1).permute(2, 0, 1, 3).reshape(n, heads, -1)
    return o.float(), lse.reshape(kv_heads, group, n).permute(2, 0, 1).reshape(n, heads)


def _suffix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      out: torch.Tensor) -> torch.Tensor:
    """The suffix case (see the module docstring); shapes as in :func:`subset_attention_ref`."""
    n, prefix = q.shape[0], k.shape[0] - q.shape[0]
    if n == 1:                               # one query sees every key: no mask at all
        return suffix_attention(q, [(k, v)], None, scale, out)
    return suffix_attention(q, [(k[:prefix], v[:prefix])], (k[prefix:], v[prefix:]), scale,
                            out)


Pair = tuple[torch.Tensor, torch.Tensor]


def _one_call(n: int, before: int, group: int, limit: int) -> bool:
    """Whether ``n`` queries over ``before`` keys and their own take one masked call: several
    queries, some keys before theirs, at most ``limit`` keys in all and a small mask."""
    return n > 1 and 0 < before <= limit - n and group * n * (before + n) <= \
        _ONE_CALL_MASK_ELEMENTS


@functools.lru_cache(maxsize=4)     # one mask serves every layer of a forward
def _own_block_mask(n: int, before: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[1, 1, group * n, before + n]`` of ``n`` queries over ``before`` keys they
    all see and their own ``n`` (query ``i`` sees own keys ``0 .. i``), its rows repeated per
    folded query group (row ``g * n + i`` is query ``i``). Read-only: it is shared."""
    mask = torch.zeros(n, before + n, dtype=dtype)
    mask[:, before:].masked_fill_(torch.ones(n, n, dtype=torch.bool).triu_(1), float("-inf"))
    return mask.repeat(group, 1)[None, None]


def suffix_attention(q: torch.Tensor, pieces: Sequence[Pair], own: Pair | None, scale: float,
                     out: torch.Tensor, one_call_keys: int = ONE_CALL_KEYS) -> torch.Tensor:
    """Attention of ``n`` queries that end a sequence whose keys come in pieces (CPU).

    ``q`` ``[n, heads, dim]``. ``pieces``: ``(k, v)`` pairs ``[m, kv_heads, dim]`` /
    ``[m, kv_heads, dim_v]`` that every query sees whole, in any order and split (views of a
    paged pool's runs: nothing is gathered). ``own``: the queries' own keys and values, ``n``
    rows in order, query ``i`` seeing rows ``0 .. i``; None when every key a query sees is in
    ``pieces`` (a single query's own key may be put there). Each piece is one fused
    flash-attention call, the results merged by log-sum-exp; ``out`` ``[n, heads, dim_v]``
    (q's dtype) is written and returned. With ``own``, at most ``one_call_keys`` keys in all and
    a small enough mask, the keys are put end to end and attended in one call (the module
    doc): then how they are split into pieces changes no bit of the result.
    """
    if own is not None and own[0].shape[0] != q.shape[0]:
        raise ValueError(f"own holds {own[0].shape[0]} keys for {q.shape[0]} queries")
    before, n = sum(k.shape[0] for k, _ in pieces), q.shape[0]
    if own is not None and _one_call(n, before, group := q.shape[1] // own[0].shape[1],
                                     one_call_keys):
        keys = torch.cat([k for k, _ in pieces] + [own[0]])
        values = torch.cat([v for _, v in pieces] + [own[1]])
        mask = _own_block_mask(n, before, group, q.dtype)
        return out.copy_(_flash(q, keys, values, False, scale, mask)[0])
    parts = [_flash(q, k, v, False, scale) for k, v in pieces if k.shape[0]]
    if own is not None and q.shape[0]:
        parts.append(_flash(q, own[0], own[1], q.shape[0] > 1, scale))
    if not parts:
        raise ValueError("suffix_attention needs at least one key")
    if len(parts) == 1:
        return out.copy_(parts[0][0])
    lse = torch.stack([lse for _, lse in parts])                  # [parts, n, heads]
    weights = (lse - lse.amax(0)).exp_().unsqueeze(-1)
    merged = (torch.stack([o for o, _ in parts]) * weights).sum(0) / weights.sum(0)
    return out.copy_(merged)


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
    if _is_suffix(q_positions, kv_positions):
        return _suffix_attention(q, k, v, scale, out)

    kv_pos, kv_order = _in_order(kv_positions.long())
    if _FLASH_CPU is not None and q.device.type == "cpu":
        return _blocked_flash(q, q_positions.long(), k if kv_order is None else k[kv_order],
                              v if kv_order is None else v[kv_order], kv_pos, scale, out)
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


def _blocked_flash(q: torch.Tensor, q_positions: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, kv_pos: torch.Tensor, scale: float,
                   out: torch.Tensor) -> torch.Tensor:
    """The general case on CPU (module doc): keys ascending by ``kv_pos``; ``out`` written."""
    group = q.shape[1] // k.shape[1]
    kh = k.transpose(0, 1).unsqueeze(0)                  # [1, KVH, n_kv, D]
    vh = v.transpose(0, 1).unsqueeze(0)
    if group > 1:                                        # a per-query mask: no folding
        kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    q_pos, q_order = _in_order(q_positions)
    qs = q if q_order is None else q[q_order]
    result = torch.zeros(out.shape, dtype=q.dtype, device=q.device)
    for lo in range(0, q.shape[0], _BLOCK_Q):
        hi = min(q.shape[0], lo + _BLOCK_Q)
        n = int(torch.searchsorted(kv_pos, q_pos[hi - 1], right=True))
        if n == 0:
            continue                     # no query of the block sees a key: zero rows
        hidden = kv_pos[None, :n] > q_pos[lo:hi, None]   # [c, n]
        mask = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device).masked_fill_(
            hidden, float("-inf"))
        o, _ = _FLASH_CPU(qs[lo:hi].transpose(0, 1).unsqueeze(0), kh[:, :, :n], vh[:, :, :n],
                          0.0, False, attn_mask=mask, scale=scale)
        # A row with no visible key has no defined softmax: those queries get zeros.
        result[lo:hi] = o[0].transpose(0, 1).masked_fill(hidden.all(dim=-1)[:, None, None], 0.0)
    if q_order is not None:
        result = torch.empty_like(result).index_copy_(0, q_order, result)
    return out.copy_(result)
