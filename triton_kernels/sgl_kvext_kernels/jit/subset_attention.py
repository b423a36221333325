# mypy: allow-untyped-defs
"""``@triton.jit`` flash-style attention for a scattered subset of queries, position-masked.

Grid ``(cdiv(n_q, BLOCK_Q), n_q_heads)``: one program owns ``BLOCK_Q`` queries of one query
head and streams every KV block of the matching KV head (``head // GROUP``) with an online
softmax in float32. Key ``j`` is visible to query ``i`` iff ``kv_pos[j] <= q_pos[i]``;
positions are compared. Keys after the program's last query position add nothing: with
``KV_SORTED`` (KV positions ascending, the caller's promise) a binary search finds where they
start and the loop stops there; otherwise every block is visited and one whose every key lies
after that position is skipped (its positions are read, nothing else). A causal prefill so
computes about half the blocks. Masks cover the ragged ends of the query and KV ranges and of
the head dims (``BLOCK_D >= D``, ``BLOCK_DV >= DV``).
"""

# (Triton reads parameter annotations as specialisation hints: jit code stays unannotated.)
import triton
import triton.language as tl


@triton.jit
def _attend_block(q, q_pos, kv_pos, offs_kv, kv_mask, k_ptr, v_ptr, kv_head, stride_kn,
                  stride_kh, stride_vn, stride_vh, offs_d, offs_dv, d_mask, dv_mask, qk_scale,
                  m_i, l_i, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One KV block into the running (max, sum, output) of the online softmax."""
    kv_rows = offs_kv.to(tl.int64)
    # K loaded transposed: [BLOCK_D, BLOCK_KV].
    k = tl.load(
        k_ptr + kv_rows[None, :] * stride_kn + kv_head * stride_kh + offs_d[:, None],
        mask=d_mask[:, None] & kv_mask[None, :],
        other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
    visible = kv_mask[None, :] & (kv_pos[None, :] <= q_pos[:, None])
    s = tl.where(visible, s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row that has seen no visible key keeps m = -inf; shift by 0 to avoid inf - inf.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)

    v = tl.load(
        v_ptr + kv_rows[:, None] * stride_vn + kv_head * stride_vh + offs_dv[None, :],
        mask=kv_mask[:, None] & dv_mask[None, :],
        other=0.0,
    )
    if UPCAST:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def subset_attention_kernel(
    q_ptr,
    q_pos_ptr,
    k_ptr,
    v_ptr,
    kv_pos_ptr,
    out_ptr,
    n_q,
    n_kv,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_on,
    stride_oh,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # dot in float32 (the interpreter cannot multiply bfloat16)
    KV_SORTED: tl.constexpr,  # kv positions ascending: stop at the first key past the queries
):
    """``out[i, h] = softmax_j(q[i, h] . k[j, h // GROUP] * scale | visible) @ v[j, h // GROUP]``;
    a query with no visible key gets a zero row."""
    pid_q = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP

    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_mask = offs_q < n_q
    d_mask = offs_d < D
    dv_mask = offs_dv < DV

    q_rows = offs_q.to(tl.int64)[:, None] * stride_qn + head * stride_qh
    q = tl.load(
        q_ptr + q_rows + offs_d[None, :], mask=q_mask[:, None] & d_mask[None, :], other=0.0
    )
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = tl.load(q_pos_ptr + offs_q, mask=q_mask, other=0).to(tl.int64)
    q_last = tl.max(tl.where(q_mask, q_pos, -1), axis=0)

    # Running max (base-2 logits), running sum and unnormalised output, all float32.
    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_DV], dtype=tl.float32)

    if KV_SORTED:
        # Keys [0, kv_end) have positions <= q_last: a binary search over the positions.
        lo = q_last * 0
        hi = lo + n_kv
        while lo < hi:
            mid = (lo + hi) // 2
            before = tl.load(kv_pos_ptr + mid).to(tl.int64) <= q_last
            lo = tl.where(before, mid + 1, lo)
            hi = tl.where(before, hi, mid)
        kv_end = lo.to(tl.int32)
        for start in range(0, kv_end, BLOCK_KV):
            offs_kv = start + tl.arange(0, BLOCK_KV)
            kv_mask = offs_kv < n_kv
            kv_pos = tl.load(kv_pos_ptr + offs_kv, mask=kv_mask, other=0).to(tl.int64)
            m_i, l_i, acc = _attend_block(q, q_pos, kv_pos, offs_kv, kv_mask, k_ptr, v_ptr,
                                          kv_head, stride_kn, stride_kh, stride_vn, stride_vh,
                                          offs_d, offs_dv, d_mask, dv_mask, qk_scale, m_i, l_i,
                                          acc, DOT_PRECISION, UPCAST)
    else:
        for start in range(0, n_kv, BLOCK_KV):
            offs_kv = start + tl.arange(0, BLOCK_KV)
            kv_mask = offs_kv < n_kv
            kv_pos = tl.load(kv_pos_ptr + offs_kv, mask=kv_mask, other=0).to(tl.int64)
            kv_first = tl.min(tl.where(kv_mask, kv_pos, q_last + 1), axis=0)
            if kv_first <= q_last:   # else no key of the block is visible to any query here
                m_i, l_i, acc = _attend_block(q, q_pos, kv_pos, offs_kv, kv_mask, k_ptr, v_ptr,
                                              kv_head, stride_kn, stride_kh, stride_vn,
                                              stride_vh, offs_d, offs_dv, d_mask, dv_mask,
                                              qk_scale, m_i, l_i, acc, DOT_PRECISION, UPCAST)

    # l_i == 0 exactly when no key was visible; acc is 0 there too, so the row is 0.
    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_rows = offs_q.to(tl.int64)[:, None] * stride_on + head * stride_oh
    tl.store(
        out_ptr + o_rows + offs_dv[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=q_mask[:, None] & dv_mask[None, :],
    )
