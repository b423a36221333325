"""Gather / scatter of token rows between an SGLang-style KV pool and a contiguous buffer.

SGLang's ``MHATokenToKVPool`` keeps, per layer, ``k_buffer[layer]`` and ``v_buffer[layer]`` of
shape ``[pool_slots, n_heads, head_dim]``; a request's KV lives at the (token-granular) slot
indices ``locs`` read from ``req_to_token``. CacheBlend gathers those rows into a contiguous
buffer, blends / recomputes some of them, and scatters the result back.

Index checks cost one device-to-host sync per call (a min / max, plus a sort for
``scatter_kv``'s uniqueness check): an out-of-range slot would otherwise be a silent
out-of-bounds access in the Triton kernel.
"""

from __future__ import annotations

import torch
import triton

from sgl_kvext_kernels._validate import (
    check_dim,
    check_same_device,
    check_tensor,
    resolve_backend,
)
from sgl_kvext_kernels.reference.paged_kv import gather_kv_ref, scatter_kv_ref

LOC_DTYPES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)
# Elements one program moves per row chunk: BLOCK_N tokens x BLOCK_W row elements.
_TILE = 4096
_MAX_BLOCK_W = 512


def _check_pool(pool: object) -> torch.Tensor:
    checked: torch.Tensor = check_tensor("pool", pool, ndim=3, contiguous=True)
    if checked.shape[1] == 0 or checked.shape[2] == 0:
        raise ValueError(f"pool needs n_heads >= 1 and head_dim >= 1, got {tuple(checked.shape)}")
    return checked


def _check_locs(locs: torch.Tensor, pool_slots: int, *, unique: bool) -> None:
    """Values of a non-empty ``locs`` lie in ``[0, pool_slots)`` (and are unique if asked)."""
    if not unique:
        lo, hi = torch.stack([locs.min().long(), locs.max().long()]).tolist()
        _check_range(lo, hi, pool_slots)
        return
    s = locs.sort().values
    repeated = s[1:] == s[:-1]
    lo, hi, n_rep = torch.stack([s[0].long(), s[-1].long(), repeated.sum()]).tolist()
    _check_range(lo, hi, pool_slots)
    if n_rep:
        slot = int(s[1:][repeated][0])
        raise ValueError(f"locs must be unique for scatter_kv, got slot {slot} more than once")


def _check_range(lo: int, hi: int, pool_slots: int) -> None:
    if lo < 0 or hi >= pool_slots:
        raise IndexError(
            f"locs must lie in [0, {pool_slots}) (pool_slots), got values in [{lo}, {hi}]"
        )


def _blocks(width: int) -> tuple[int, int]:
    """``(BLOCK_N, BLOCK_W)``: powers of two with ``BLOCK_N * BLOCK_W <= _TILE``."""
    block_w = min(triton.next_power_of_2(width), _MAX_BLOCK_W)
    return max(1, _TILE // block_w), block_w


def gather_kv(
    pool: torch.Tensor,
    locs: torch.Tensor,
    *,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy the pool rows at ``locs`` into a contiguous buffer: ``out[i] = pool[locs[i]]``.

    Parameters
    ----------
    pool : Tensor[pool_slots, n_heads, head_dim]
        One layer's K or V buffer; float32, float16 or bfloat16, contiguous.
    locs : Tensor[n]
        Slot indices, int32 or int64, contiguous, each in ``[0, pool_slots)``; repeats are
        allowed. ``n`` may be 0.
    backend : {"auto", "triton", "torch"}
        ``auto`` runs Triton on CUDA and the torch reference elsewhere.
    out : Tensor[n, n_heads, head_dim], optional
        Contiguous destination of ``pool``'s dtype and device; allocated when omitted.

    Returns
    -------
    Tensor[n, n_heads, head_dim]
        ``out`` (or a new tensor) in ``pool``'s dtype.

    Raises
    ------
    TypeError, ValueError
        For a wrong type, rank, dtype, shape, layout, device or backend.
    IndexError
        If a slot index lies outside ``[0, pool_slots)``.
    """
    pool = _check_pool(pool)
    locs = check_tensor("locs", locs, ndim=1, dtypes=LOC_DTYPES, contiguous=True)
    device = check_same_device(pool=pool, locs=locs)
    use = resolve_backend(backend, device)
    n = locs.shape[0]
    if out is None:
        out = torch.empty((n, *pool.shape[1:]), dtype=pool.dtype, device=device)
    else:
        out = check_tensor("out", out, ndim=3, dtypes=(pool.dtype,), contiguous=True)
        check_same_device(pool=pool, out=out)
        check_dim("out", out, 0, n, "len(locs)")
        check_dim("out", out, 1, pool.shape[1], "pool n_heads")
        check_dim("out", out, 2, pool.shape[2], "pool head_dim")
    if n == 0:
        return out
    _check_locs(locs, pool.shape[0], unique=False)

    if use == "torch":
        return gather_kv_ref(pool, locs, out=out)
    from sgl_kvext_kernels.jit.paged_kv import gather_kv_kernel

    width = pool.shape[1] * pool.shape[2]
    block_n, block_w = _blocks(width)
    grid = (triton.cdiv(n, block_n),)
    gather_kv_kernel[grid](pool, locs, out, n, width, BLOCK_N=block_n, BLOCK_W=block_w)
    return out


def scatter_kv(
    pool: torch.Tensor,
    locs: torch.Tensor,
    rows: torch.Tensor,
    *,
    backend: str = "auto",
) -> None:
    """Write ``rows`` into the pool in place: ``pool[locs[i]] = rows[i]``.

    ``rows`` may have another float dtype than ``pool`` (e.g. a float32 blend buffer written
    into a bfloat16 pool): values are cast to ``pool.dtype`` on write, rounding to nearest
    (as ``Tensor.to`` does). Slots not named in ``locs`` are left untouched.

    Parameters
    ----------
    pool : Tensor[pool_slots, n_heads, head_dim]
        One layer's K or V buffer; float32, float16 or bfloat16, contiguous; updated in place.
    locs : Tensor[n]
        Slot indices, int32 or int64, contiguous, each in ``[0, pool_slots)`` and **unique**
        (two writes to one slot would race on the GPU). ``n`` may be 0 (a no-op).
    rows : Tensor[n, n_heads, head_dim]
        Values to write; float32, float16 or bfloat16, contiguous, on ``pool``'s device.
    backend : {"auto", "triton", "torch"}
        ``auto`` runs Triton on CUDA and the torch reference elsewhere.

    Raises
    ------
    TypeError, ValueError
        For a wrong type, rank, dtype, shape, layout, device or backend, or a repeated slot.
    IndexError
        If a slot index lies outside ``[0, pool_slots)``.
    """
    pool = _check_pool(pool)
    locs = check_tensor("locs", locs, ndim=1, dtypes=LOC_DTYPES, contiguous=True)
    rows = check_tensor("rows", rows, ndim=3, contiguous=True)
    device = check_same_device(pool=pool, locs=locs, rows=rows)
    use = resolve_backend(backend, device)
    n = locs.shape[0]
    check_dim("rows", rows, 0, n, "len(locs)")
    check_dim("rows", rows, 1, pool.shape[1], "pool n_heads")
    check_dim("rows", rows, 2, pool.shape[2], "pool head_dim")
    if n == 0:
        return
    _check_locs(locs, pool.shape[0], unique=True)

    if use == "torch":
        scatter_kv_ref(pool, locs, rows)
        return
    from sgl_kvext_kernels.jit.paged_kv import scatter_kv_kernel

    width = pool.shape[1] * pool.shape[2]
    block_n, block_w = _blocks(width)
    grid = (triton.cdiv(n, block_n),)
    scatter_kv_kernel[grid](pool, locs, rows, n, width, BLOCK_N=block_n, BLOCK_W=block_w)
