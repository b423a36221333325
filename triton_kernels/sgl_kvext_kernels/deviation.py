"""KV deviation per token and top-deviation token selection (CacheBlend / LMCache).

CacheBlend recomputes only the tokens whose cached K (re-rotated to the new positions)
deviates most from the freshly computed K of a probe layer; the rest reuse the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import torch

from sgl_kvext_kernels._validate import (
    FLOAT_DTYPES,
    check_dim,
    check_same_device,
    check_tensor,
    resolve_backend,
)

_BLOCK_T = 8  # tokens per program
_MAX_BLOCK_D = 256  # elements of one row per loop step
_DEVIATION_DTYPES: tuple[torch.dtype, ...] = (*FLOAT_DTYPES, torch.float64)
# ceil(ratio * n) treats products within this of an integer as that integer, so that
# 0.1 * 30 == 3.0000000000000004 selects 3 tokens, not 4.
_CEIL_SLACK = 1e-6


@dataclass(frozen=True, eq=False)
class DeviationSelection:
    """Tokens picked by :func:`select_top_deviation`.

    A frozen dataclass rather than a NamedTuple: ``count`` would shadow ``tuple.count``.
    No ``==`` (it would compare tensors); compare ``indices`` and ``count`` explicitly.

    Attributes
    ----------
    indices : Tensor [count]
        int64 token indices, unique, sorted ascending, on the deviation's device.
    count : int
        ``indices.numel()``.
    """

    indices: torch.Tensor
    count: int


def _check_rows_dense(name: str, t: torch.Tensor) -> None:
    """Rows may be strided, but each row's ``n_heads * head_dim`` elements must be dense."""
    _, n_heads, head_dim = t.shape
    if t.stride(2) != 1 or (n_heads > 1 and t.stride(1) != head_dim):
        raise ValueError(
            f"{name} must have dense rows (stride(2) == 1, stride(1) == head_dim), "
            f"got strides {t.stride()} for shape {tuple(t.shape)}"
        )


def kv_deviation(
    cached: torch.Tensor, fresh: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Per-token squared L2 distance between cached and freshly computed K (or V).

    Parameters
    ----------
    cached, fresh : Tensor [n_tokens, n_heads, head_dim]
        Same shape, dtype (float32 / float16 / bfloat16) and device. The token stride is free;
        within a token the ``n_heads * head_dim`` elements must be contiguous.
    backend : {"auto", "triton", "torch"}
        ``auto``: Triton on CUDA, the torch reference elsewhere.

    Returns
    -------
    Tensor [n_tokens]
        float32, ``sum over heads and dims of (fresh - cached) ** 2``, accumulated in float32.
    """
    cached = check_tensor("cached", cached, ndim=3)
    fresh = check_tensor("fresh", fresh, ndim=3, dtypes=(cached.dtype,))
    for dim, what in ((0, "n_tokens"), (1, "n_heads"), (2, "head_dim")):
        check_dim("fresh", fresh, dim, cached.shape[dim], f"cached {what}")
    device = check_same_device(cached=cached, fresh=fresh)
    if resolve_backend(backend, device) == "torch":
        from sgl_kvext_kernels.reference.deviation import kv_deviation_ref

        return kv_deviation_ref(cached, fresh)

    import triton

    from sgl_kvext_kernels.jit.deviation import kv_deviation_kernel

    _check_rows_dense("cached", cached)
    _check_rows_dense("fresh", fresh)
    n_tokens, n_heads, head_dim = cached.shape
    row_len = n_heads * head_dim
    if n_tokens == 0 or row_len == 0:
        return torch.zeros(n_tokens, dtype=torch.float32, device=device)
    out = torch.empty(n_tokens, dtype=torch.float32, device=device)
    grid = (triton.cdiv(n_tokens, _BLOCK_T),)
    kv_deviation_kernel[grid](
        cached,
        fresh,
        out,
        n_tokens,
        row_len,
        cached.stride(0),
        fresh.stride(0),
        BLOCK_T=_BLOCK_T,
        BLOCK_D=min(triton.next_power_of_2(row_len), _MAX_BLOCK_D),
    )
    return out


def _selection_size(ratio: float, min_tokens: int, n_candidates: int) -> int:
    """``clamp(ceil(ratio * n), min(min_tokens, n), n)`` for ``n = n_candidates``."""
    k = math.ceil(ratio * n_candidates - _CEIL_SLACK) if ratio > 0 else 0
    return max(min(k, n_candidates), min(min_tokens, n_candidates))


def select_top_deviation(
    deviation: torch.Tensor,
    ratio: float,
    *,
    min_tokens: int = 1,
    candidates: torch.Tensor | None = None,
) -> DeviationSelection:
    """Pick the tokens with the largest deviation (the ones CacheBlend recomputes).

    Selects ``k = clamp(ceil(ratio * n), min(min_tokens, n), n)`` tokens, ``n`` the number of
    candidates: ``ratio == 0`` selects ``min(min_tokens, n)`` (none when ``min_tokens == 0``),
    ``ratio == 1`` all candidates. Ties go to the lower token index. NaN counts as larger
    than any number (a corrupt cached entry is recomputed).

    Parameters
    ----------
    deviation : Tensor [n_tokens]
        Float scores, e.g. from :func:`kv_deviation`.
    ratio : float
        Fraction of the candidates to select, in ``[0, 1]``.
    min_tokens : int
        Lower bound on the count (capped at the number of candidates), ``>= 0``.
    candidates : Tensor [n_tokens], optional
        bool mask on ``deviation``'s device; only ``True`` tokens may be selected. Default: all.

    Returns
    -------
    DeviationSelection
        ``indices`` int64 [k] sorted ascending, and ``count == k``.
    """
    deviation = check_tensor("deviation", deviation, ndim=1, dtypes=_DEVIATION_DTYPES)
    if isinstance(ratio, bool) or not isinstance(ratio, Real):
        raise TypeError(f"ratio must be a real number, got {type(ratio).__name__}")
    if not 0.0 <= ratio <= 1.0:  # also rejects NaN
        raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, Integral):
        raise TypeError(f"min_tokens must be an int, got {type(min_tokens).__name__}")
    min_tokens = int(min_tokens)
    if min_tokens < 0:
        raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")
    device = deviation.device
    if candidates is None:
        cand_idx = torch.arange(deviation.shape[0], dtype=torch.int64, device=device)
    else:
        candidates = check_tensor("candidates", candidates, ndim=1, dtypes=(torch.bool,))
        check_dim("candidates", candidates, 0, deviation.shape[0], "deviation.shape[0]")
        check_same_device(deviation=deviation, candidates=candidates)
        cand_idx = candidates.nonzero().squeeze(1)  # ascending
    n_candidates = cand_idx.numel()
    k = _selection_size(float(ratio), min_tokens, n_candidates)
    if k == n_candidates:
        return DeviationSelection(indices=cand_idx, count=k)
    # Stable descending sort over ascending indices: among equal scores the lower index
    # comes first. (torch.topk does not specify the order of ties.)
    order = torch.sort(deviation[cand_idx], descending=True, stable=True).indices[:k]
    indices = torch.sort(cand_idx[order]).values
    return DeviationSelection(indices=indices, count=k)
