"""Attention for a scattered subset of query tokens over a KV buffer, position-masked.

CacheBlend's partial recompute runs attention only for the selected tokens, which sit at
arbitrary (unsorted) positions of the prompt; each sees every key whose position is ``<=`` its
own. Query heads are grouped over KV heads (GQA): query head ``h`` reads KV head
``h // (n_q_heads // n_kv_heads)``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import torch
import triton

from sgl_kvext_kernels._validate import (
    check_dim,
    check_same_device,
    check_tensor,
    resolve_backend,
)
from sgl_kvext_kernels.reference.subset_attention import subset_attention_ref

POS_DTYPES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)


def _check_inner_contiguous(name: str, t: torch.Tensor) -> None:
    """The last dim is dense (stride 1); token and head strides may be anything."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have stride 1 in its last dim, got strides {t.stride()}")


def _check_positive_dims(name: str, t: torch.Tensor) -> None:
    if t.shape[1] == 0 or t.shape[2] == 0:
        raise ValueError(f"{name} needs >= 1 head and head_dim >= 1, got shape {tuple(t.shape)}")


class _Tiles(NamedTuple):
    block_q: int
    block_kv: int
    block_d: int
    block_dv: int
    num_warps: int
    num_stages: int


def _tiles(dtype: torch.dtype, n_q: int, head_dim: int, head_dim_v: int,
           shared_bytes: int | None = None) -> _Tiles:
    """Launch shape: powers of two, every tl.dot dim >= 16. float32 tiles are halved and
    pipelined less; head dims above 128 halve the KV block and double the warps. Within
    ``shared_bytes`` (the device's shared memory per block; None: unbounded) by pipelining
    less, then halving the KV block: bf16 at head_dim 128 wants ~112 KiB in three stages, which
    fits an H100 / H200 (227 KiB) but not an L4 / A10G (99 KiB), where two stages take 80 KiB."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_dv = max(16, triton.next_power_of_2(head_dim_v))
    wide = max(block_d, block_dv) > 128
    fp32 = dtype == torch.float32
    block_q = min(32 if fp32 else 64, max(16, triton.next_power_of_2(n_q)))
    block_kv = (16 if wide else 32) if fp32 else (32 if wide else 64)
    tiles = _Tiles(block_q, block_kv, block_d, block_dv, 8 if wide else 4, 2 if fp32 else 3)
    while shared_bytes is not None and _shared_bytes(tiles, dtype) > shared_bytes:
        if tiles.num_stages > 1:
            tiles = tiles._replace(num_stages=tiles.num_stages - 1)
        elif tiles.block_kv > 16:
            tiles = tiles._replace(block_kv=tiles.block_kv // 2)
        else:
            break
    return tiles


def _shared_bytes(tiles: _Tiles, dtype: torch.dtype) -> int:
    """Shared memory a launch needs, estimated: the pipelined K and V tiles and the Q tile."""
    size = 4 if dtype == torch.float32 else 2
    kv = tiles.block_kv * (tiles.block_d + tiles.block_dv) * size
    return tiles.num_stages * kv + tiles.block_q * tiles.block_d * size


@lru_cache(maxsize=16)
def _device_shared_bytes(index: int) -> int:
    """Shared memory per block the CUDA device ``index`` allows (Triton's driver query)."""
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    return int(props["max_shared_mem"])


def _resolve_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def subset_attention(
    q: torch.Tensor,
    q_positions: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_positions: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
    out: torch.Tensor | None = None,
    kv_sorted: bool = False,
) -> torch.Tensor:
    """Softmax attention of selected queries over a KV buffer with a position-causal mask.

    Key ``j`` is visible to query ``i`` iff ``kv_positions[j] <= q_positions[i]``. Positions are
    only compared: neither needs to be sorted, and KV positions may repeat. Scores and softmax
    are computed in float32. A query that sees no key (all KV positions above its own, or
    ``n_kv == 0``) gets an all-zero output row. ``q``, ``k``, ``v`` and ``out`` need a dense
    last dim (stride 1); their token and head strides are free, so views split from a fused QKV
    projection need no copy.

    Parameters
    ----------
    q : Tensor[n_q, n_q_heads, head_dim]
        Queries; float32, float16 or bfloat16. ``n_q`` may be 0.
    q_positions : Tensor[n_q]
        Position of each query; int32 or int64, contiguous.
    k : Tensor[n_kv, n_kv_heads, head_dim]
        Keys, ``q``'s dtype; ``n_q_heads`` must be a multiple of ``n_kv_heads``.
    v : Tensor[n_kv, n_kv_heads, head_dim_v]
        Values, ``q``'s dtype.
    kv_positions : Tensor[n_kv]
        Position of each key; int32 or int64, contiguous.
    scale : float, optional
        Multiplies ``q . k``; ``1 / sqrt(head_dim)`` when omitted.
    backend : {"auto", "triton", "torch"}
        ``auto`` runs Triton on CUDA and the torch reference elsewhere.
    out : Tensor[n_q, n_q_heads, head_dim_v], optional
        Destination of ``q``'s dtype and device; allocated when omitted.
    kv_sorted : bool
        The caller promises ``kv_positions`` ascending (not checked: that would wait for the
        device): the Triton kernel then stops at the first key after a query block's last
        position instead of visiting every block.

    Returns
    -------
    Tensor[n_q, n_q_heads, head_dim_v]
        ``out`` (or a new tensor) in ``q``'s dtype.

    Raises
    ------
    TypeError, ValueError
        For a wrong type, rank, dtype, shape, layout, device, scale or backend.
    """
    q = check_tensor("q", q, ndim=3)
    k = check_tensor("k", k, ndim=3, dtypes=(q.dtype,))
    v = check_tensor("v", v, ndim=3, dtypes=(q.dtype,))
    q_positions = check_tensor(
        "q_positions", q_positions, ndim=1, dtypes=POS_DTYPES, contiguous=True
    )
    kv_positions = check_tensor(
        "kv_positions", kv_positions, ndim=1, dtypes=POS_DTYPES, contiguous=True
    )
    device = check_same_device(
        q=q, q_positions=q_positions, k=k, v=v, kv_positions=kv_positions
    )
    use = resolve_backend(backend, device)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_positive_dims(name, t)
        _check_inner_contiguous(name, t)
    n_q, n_q_heads, head_dim = q.shape
    n_kv, n_kv_heads, head_dim_v = v.shape
    check_dim("q_positions", q_positions, 0, n_q, "n_q = q.shape[0]")
    check_dim("k", k, 0, n_kv, "n_kv = v.shape[0]")
    check_dim("k", k, 1, n_kv_heads, "n_kv_heads = v.shape[1]")
    check_dim("k", k, 2, head_dim, "head_dim = q.shape[2]")
    check_dim("kv_positions", kv_positions, 0, n_kv, "n_kv = k.shape[0]")
    if n_q_heads % n_kv_heads != 0:
        raise ValueError(
            f"n_q_heads ({n_q_heads}) must be a multiple of n_kv_heads ({n_kv_heads})"
        )
    sm_scale = _resolve_scale(scale, head_dim)
    if out is None:
        out = q.new_empty((n_q, n_q_heads, head_dim_v))
    else:
        out = check_tensor("out", out, ndim=3, dtypes=(q.dtype,))
        check_same_device(q=q, out=out)
        check_dim("out", out, 0, n_q, "n_q")
        check_dim("out", out, 1, n_q_heads, "n_q_heads")
        check_dim("out", out, 2, head_dim_v, "head_dim_v")
        _check_inner_contiguous("out", out)
    if n_q == 0:
        return out

    if use == "torch":
        return subset_attention_ref(q, q_positions, k, v, kv_positions, sm_scale, out=out)
    from triton.runtime.interpreter import InterpretedFunction

    from sgl_kvext_kernels.jit.subset_attention import subset_attention_kernel

    # Triton's interpreter runs tl.dot on the raw bits of bfloat16: upcast there only.
    upcast = q.dtype == torch.bfloat16 and isinstance(subset_attention_kernel, InterpretedFunction)

    shared = None if upcast or q.device.type != "cuda" else _device_shared_bytes(
        q.device.index if q.device.index is not None else torch.cuda.current_device())
    tiles = _tiles(q.dtype, n_q, head_dim, head_dim_v, shared)
    grid = (triton.cdiv(n_q, tiles.block_q), n_q_heads)
    subset_attention_kernel[grid](
        q,
        q_positions,
        k,
        v,
        kv_positions,
        out,
        n_q,
        n_kv,
        sm_scale * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        GROUP=n_q_heads // n_kv_heads,
        D=head_dim,
        DV=head_dim_v,
        BLOCK_Q=tiles.block_q,
        BLOCK_KV=tiles.block_kv,
        BLOCK_D=tiles.block_d,
        BLOCK_DV=tiles.block_dv,
        # float32 dots in full precision (not TF32); 16-bit inputs take Triton's default.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or upcast else None,
        UPCAST=upcast,
        KV_SORTED=bool(kv_sorted),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out
