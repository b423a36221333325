# mypy: allow-untyped-defs
"""``@triton.jit`` code for the per-token KV deviation (CacheBlend token selection)."""

import triton
import triton.language as tl


@triton.jit
def kv_deviation_kernel(
    cached_ptr,
    fresh_ptr,
    out_ptr,
    n_tokens,
    row_len,
    stride_ct,
    stride_ft,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per BLOCK_T tokens: ``out[t] = sum((fresh[t] - cached[t]) ** 2)`` over the
    ``row_len = n_heads * head_dim`` contiguous elements of row ``t``, in float32."""
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < n_tokens
    # int64 row offsets: n_tokens * stride may exceed 2**31 for a large KV pool.
    rows_t = offs_t.to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for start in range(0, row_len, BLOCK_D):
        offs_d = start + tl.arange(0, BLOCK_D)
        mask = mask_t[:, None] & (offs_d < row_len)[None, :]
        c = tl.load(cached_ptr + rows_t * stride_ct + offs_d[None, :], mask=mask, other=0.0)
        f = tl.load(fresh_ptr + rows_t * stride_ft + offs_d[None, :], mask=mask, other=0.0)
        diff = f.to(tl.float32) - c.to(tl.float32)
        acc += tl.sum(diff * diff, axis=1)
    tl.store(out_ptr + offs_t, acc, mask=mask_t)
