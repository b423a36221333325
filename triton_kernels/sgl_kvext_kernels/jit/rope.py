# mypy: allow-untyped-defs
"""``@triton.jit`` code for RoPE re-rotation (neox / rotate-half layout)."""

import triton
import triton.language as tl


@triton.jit
def rerotate_k_kernel(
    k_ptr,
    out_ptr,
    old_pos_ptr,
    new_pos_ptr,
    inv_freq_ptr,
    n_tokens,
    stride_kt,
    stride_kh,
    stride_ot,
    stride_oh,
    HALF_ROT: tl.constexpr,
    N_PASS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """One program per (block of BLOCK_T tokens, head).

    Dims ``[0, HALF_ROT)`` pair with ``[HALF_ROT, 2 * HALF_ROT)`` and rotate by
    ``(new - old) * inv_freq``; the ``N_PASS`` dims after ``2 * HALF_ROT`` are copied.
    Every element is read and written by the same program, so ``out`` may alias ``k``.
    """
    pid_t = tl.program_id(0)
    head = tl.program_id(1)

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < n_tokens
    # int64 delta first, then float32: the angle never sees a rounded absolute position.
    old = tl.load(old_pos_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    new = tl.load(new_pos_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    delta = (new - old).to(tl.float32)

    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < HALF_ROT
    freq = tl.load(inv_freq_ptr + offs_r, mask=mask_r, other=0.0)
    angle = delta[:, None] * freq[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle)

    # int64 row offsets: n_tokens * stride may exceed 2**31 for a large KV pool.
    row_k = k_ptr + offs_t.to(tl.int64)[:, None] * stride_kt + head * stride_kh
    row_o = out_ptr + offs_t.to(tl.int64)[:, None] * stride_ot + head * stride_oh
    mask = mask_t[:, None] & mask_r[None, :]
    x1 = tl.load(row_k + offs_r[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row_k + HALF_ROT + offs_r[None, :], mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    out_ty = out_ptr.dtype.element_ty
    tl.store(row_o + offs_r[None, :], y1.to(out_ty), mask=mask)
    tl.store(row_o + HALF_ROT + offs_r[None, :], y2.to(out_ty), mask=mask)

    if N_PASS > 0:
        offs_p = tl.arange(0, BLOCK_P)
        mask_p = mask_t[:, None] & (offs_p < N_PASS)[None, :]
        col = 2 * HALF_ROT + offs_p[None, :]
        x = tl.load(row_k + col, mask=mask_p, other=0.0)
        tl.store(row_o + col, x.to(out_ty), mask=mask_p)
