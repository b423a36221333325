# mypy: allow-untyped-defs
"""``@triton.jit`` gather / scatter of token rows between a KV pool and a contiguous buffer.

Both kernels view a ``[slots, n_heads, head_dim]`` tensor as rows of ``W = n_heads * head_dim``
contiguous elements. One program owns ``BLOCK_N`` tokens and walks the row in ``BLOCK_W``
chunks; masks cover the ragged last token block and the ragged end of the row.
"""

# (Triton reads parameter annotations as specialisation hints: jit code stays unannotated.)
import triton
import triton.language as tl


@triton.jit
def gather_kv_kernel(
    pool_ptr,
    locs_ptr,
    out_ptr,
    n,
    W,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """``out[i, :] = pool[locs[i], :]`` for ``i`` in this program's token block."""
    tok = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_mask = tok < n
    # Offsets in int64: slots * W may exceed 2**31 for a large pool.
    src = tl.load(locs_ptr + tok, mask=tok_mask, other=0).to(tl.int64) * W
    dst = tok.to(tl.int64) * W
    for start in range(0, W, BLOCK_W):
        col = start + tl.arange(0, BLOCK_W)
        mask = tok_mask[:, None] & (col < W)[None, :]
        vals = tl.load(pool_ptr + src[:, None] + col[None, :], mask=mask)
        tl.store(out_ptr + dst[:, None] + col[None, :], vals, mask=mask)


@triton.jit
def scatter_kv_kernel(
    pool_ptr,
    locs_ptr,
    rows_ptr,
    n,
    W,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """``pool[locs[i], :] = rows[i, :]`` cast to the pool dtype; ``locs`` unique (no races)."""
    tok = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_mask = tok < n
    dst = tl.load(locs_ptr + tok, mask=tok_mask, other=0).to(tl.int64) * W
    src = tok.to(tl.int64) * W
    for start in range(0, W, BLOCK_W):
        col = start + tl.arange(0, BLOCK_W)
        mask = tok_mask[:, None] & (col < W)[None, :]
        vals = tl.load(rows_ptr + src[:, None] + col[None, :], mask=mask)
        tl.store(
            pool_ptr + dst[:, None] + col[None, :],
            vals.to(pool_ptr.dtype.element_ty),
            mask=mask,
        )
