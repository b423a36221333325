"""Torch-native versions of the ``sgl_kernel`` CPU ops that SGLang's CPU engine imports.

The PyPI ``sgl_kernel`` wheel cannot load without libcuda, yet SGLang's CPU engine
(``SGLANG_USE_CPU_ENGINE=1``) imports a few of its ops at module import. When the real
package cannot load, :mod:`sgl_kvext.sglang_plugin.kernel_fallback` puts a shim
``sgl_kernel`` package in front of it that re-exports what this module provides. Ops listed
in :data:`NOT_PROVIDED` are importable (SGLang imports them unconditionally) but raise
``NotImplementedError`` naming themselves when called; any other name is an ordinary
``ImportError``.

Only torch is imported here.
"""

from __future__ import annotations

import ctypes

import torch

#: Ops SGLang's CPU engine imports but serving without speculative decoding never calls.
NOT_PROVIDED = (
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "build_tree_kernel_efficient_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "verify_tree_greedy_cpu",
)


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor,
                                 out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """Write each request's new KV slots into its row of the request-to-token table.

    For request ``i``: ``req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]]``
    receives the next ``end_offset[i] - start_offset[i]`` entries of ``out_cache_loc``
    (requests consume ``out_cache_loc`` in order).

    Parameters
    ----------
    req_pool_indices : (batch,) int tensor
    req_to_token : (num_reqs, pool_len) int32 tensor, written in place
    start_offset, end_offset : (batch,) int tensors
    out_cache_loc : (sum of lengths,) int tensor
    pool_len : int
        Row length of ``req_to_token``.
    """
    if req_to_token.shape[-1] != pool_len:
        raise ValueError(f"req_to_token rows hold {req_to_token.shape[-1]}, pool_len={pool_len}")
    starts, ends = start_offset.tolist(), end_offset.tolist()
    rows = req_pool_indices.tolist()
    total = sum(e - s for s, e in zip(starts, ends, strict=True))
    if total > out_cache_loc.numel():
        raise ValueError(f"out_cache_loc holds {out_cache_loc.numel()} slots, {total} needed")
    pos = 0
    for row, start, end in zip(rows, starts, ends, strict=True):
        n = end - start
        if n > 0:
            req_to_token[row, start:end] = out_cache_loc[pos:pos + n].to(req_to_token.dtype)
        pos += n


def copy_all_layer_kv_cache_cpu(data_ptrs: torch.Tensor, strides: torch.Tensor,
                                tgt_loc: torch.Tensor, src_loc: torch.Tensor) -> None:
    """Copy KV rows ``src_loc`` onto rows ``tgt_loc`` in every layer buffer.

    Buffer ``b`` starts at address ``data_ptrs[b]`` and holds rows of ``strides[b]`` bytes;
    row ``tgt_loc[j]`` receives a copy of row ``src_loc[j]`` (all reads happen before any
    write, as in SGLang's tiled kernel when targets and sources do not overlap).

    Parameters
    ----------
    data_ptrs : (num_buffers,) uint64 tensor of host addresses
    strides : (num_buffers,) int tensor, bytes per row
    tgt_loc, src_loc : (num_locs,) int tensors
    """
    if tgt_loc.numel() != src_loc.numel():
        raise ValueError(f"tgt_loc has {tgt_loc.numel()} rows, src_loc {src_loc.numel()}")
    if tgt_loc.numel() == 0:
        return
    tgt, src = tgt_loc.to(torch.int64), src_loc.to(torch.int64)
    rows = int(torch.maximum(tgt.max(), src.max()).item()) + 1
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist(), strict=True):
        # A uint8 view over the first `rows` rows of the buffer (no copy).
        raw = (ctypes.c_uint8 * (rows * stride)).from_address(ptr)
        view = torch.frombuffer(raw, dtype=torch.uint8).view(rows, stride)
        view[tgt] = view[src]


def rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
            out: torch.Tensor | None = None, enable_pdl: bool | None = None) -> torch.Tensor:
    """Root-mean-square normalization ``input / rms(input) * weight``, computed in float32.

    Parameters
    ----------
    input : (..., hidden) tensor
    weight : (hidden,) tensor
    out : optional tensor shaped like ``input``, written in place and returned
    enable_pdl : ignored (a CUDA launch option)
    """
    x = input.float()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if out is None:
        return y.to(input.dtype)
    out.copy_(y)
    return out


def not_provided(name: str):  # type: ignore[no-untyped-def]
    """A callable standing in for op ``name`` that refuses to run."""
    def op(*args: object, **kwargs: object) -> None:
        raise NotImplementedError(
            f"sgl_kernel.{name} is not provided by sgl-kvext's CPU fallback (speculative "
            "decoding is not supported on SGLang's CPU engine without the real sgl_kernel)")
    op.__name__ = op.__qualname__ = name
    return op
