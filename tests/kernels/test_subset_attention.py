"""subset_attention: Triton matches the torch reference; both agree with causal SDPA on a full
sequence and on any subset of its queries; invisible queries get zeros; unsorted positions;
bad input raises a named error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sgl_kvext_kernels.subset_attention import subset_attention

# (atol, rtol) per dtype: outputs are O(1); 16-bit tolerances cover output rounding and the
# 16-bit probabilities of the Triton P @ V product.
TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
HEADS = [(1, 1), (4, 2), (9, 3)]


def _qkv(
    n_q: int, n_kv: int, heads: tuple[int, int], head_dim: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n_q_heads, n_kv_heads = heads
    q = torch.randn(n_q, n_q_heads, head_dim, generator=g).to(dtype)
    k = torch.randn(n_kv, n_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(n_kv, n_kv_heads, head_dim, generator=g).to(dtype)
    return q, k, v


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full causal attention over token order, float32, GQA by repeating KV heads."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    qh, kh, vh = (t.float().transpose(0, 1) for t in (q, k, v))
    return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).transpose(0, 1)


def _both(device: torch.device, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference, triton) results for ``(q, q_positions, k, v, kv_positions)``, on the CPU."""
    ref = subset_attention(*args, backend="torch")
    tri = subset_attention(*(a.to(device) for a in args), backend="triton")
    return ref, tri.cpu()


@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("n_kv", [1, 40, 70])
@pytest.mark.parametrize("n_q", [1, 7, 33])
@pytest.mark.parametrize("dtype", list(TOL))
def test_triton_matches_reference(
    device: torch.device,
    dtype: torch.dtype,
    n_q: int,
    n_kv: int,
    heads: tuple[int, int],
    head_dim: int,
) -> None:
    q, k, v = _qkv(n_q, n_kv, heads, head_dim, dtype)
    g = torch.Generator().manual_seed(1)
    kv_pos = torch.randperm(n_kv, generator=g) + 3  # unsorted, positions 3 .. n_kv + 2
    # Some queries see nothing (position < 3), some everything; int32 vs int64 mixed.
    q_pos = torch.randint(0, n_kv + 5, (n_q,), generator=g, dtype=torch.int32)
    ref, tri = _both(device, q, q_pos, k, v, kv_pos)
    assert tri.shape == (n_q, heads[0], head_dim) and tri.dtype == dtype
    _close(tri, ref, dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", list(TOL))
def test_all_queries_equal_causal_sdpa(
    device: torch.device, backend: str, dtype: torch.dtype
) -> None:
    n = 45
    q, k, v = _qkv(n, n, (4, 2), 80, dtype, seed=2)
    pos = torch.arange(n)
    dev = device if backend == "triton" else torch.device("cpu")
    got = subset_attention(*(t.to(dev) for t in (q, pos, k, v, pos)), backend=backend).cpu()
    _close(got, _causal_sdpa(q, k, v), dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_query_subset_equals_rows_of_full_attention(device: torch.device, backend: str) -> None:
    n = 50
    q, k, v = _qkv(n, n, (9, 3), 64, torch.float32, seed=3)
    full = _causal_sdpa(q, k, v)
    g = torch.Generator().manual_seed(4)
    idx = torch.randperm(n, generator=g)[:13]  # unsorted subset of token indices
    dev = device if backend == "triton" else torch.device("cpu")
    args = (q[idx], idx, k, v, torch.arange(n))
    got = subset_attention(*(t.to(dev) for t in args), backend=backend).cpu()
    _close(got, full[idx], torch.float32)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("n_q, n_kv", [(1, 1), (1, 90), (8, 8), (8, 90), (90, 90), (130, 200)])
def test_suffix_fast_path_equals_blocked_path(
    device: torch.device, dtype: torch.dtype, heads: tuple[int, int], n_q: int, n_kv: int
) -> None:
    """Queries that are the last keys' positions, in order, take the torch path's fused
    prefix + causal split; the same rows asked in reverse order take the blocked path; and
    Triton agrees with both."""
    q, k, v = _qkv(n_q, n_kv, heads, 64, dtype, seed=n_q + n_kv)
    kv_pos = torch.arange(n_kv) + 11
    q_pos = kv_pos[n_kv - n_q:].clone()
    fast, tri = _both(device, q, q_pos, k, v, kv_pos)
    blocked = subset_attention(q.flip(0), q_pos.flip(0), k, v, kv_pos, backend="torch").flip(0)
    _close(fast, blocked, dtype)
    _close(tri, fast, dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kv_order_does_not_matter(device: torch.device, backend: str) -> None:
    """Shuffling KV rows together with their positions changes nothing (up to rounding)."""
    q, k, v = _qkv(9, 40, (4, 2), 64, torch.float32, seed=5)
    q_pos = torch.tensor([39, 0, 17, 5, 5, 22, 38, 1, 30])
    kv_pos = torch.arange(40)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(6))
    dev = device if backend == "triton" else torch.device("cpu")
    a = subset_attention(*(t.to(dev) for t in (q, q_pos, k, v, kv_pos)), backend=backend)
    b = subset_attention(
        *(t.to(dev) for t in (q, q_pos, k[perm], v[perm], kv_pos[perm])), backend=backend
    )
    _close(a, b, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_query_without_visible_key_gets_zeros(device: torch.device, backend: str) -> None:
    q, k, v = _qkv(3, 20, (2, 1), 80, torch.float16, seed=7)
    kv_pos = torch.arange(10, 30)
    q_pos = torch.tensor([9, 10, -4])  # only the middle query sees a key (position 10)
    dev = device if backend == "triton" else torch.device("cpu")
    got = subset_attention(*(t.to(dev) for t in (q, q_pos, k, v, kv_pos)), backend=backend).cpu()
    assert torch.equal(got[[0, 2]], torch.zeros(2, 2, 80, dtype=torch.float16))
    assert torch.equal(got[1], v[0].expand(2, 80))  # one visible key: its value, exactly
    # No KV at all: every row is zero.
    empty = torch.empty(0, 1, 80, dtype=torch.float16)
    args = (q, q_pos, empty, empty, torch.empty(0, dtype=torch.int64))
    none = subset_attention(*(t.to(dev) for t in args), backend=backend).cpu()
    assert torch.equal(none, torch.zeros(3, 2, 80, dtype=torch.float16))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_views_scale_out_and_empty_queries(device: torch.device, backend: str) -> None:
    """q/k/v as views of one fused projection (token stride != row size), explicit scale and
    out, and n_q == 0."""
    n, d = 20, 64
    dev = device if backend == "triton" else torch.device("cpu")
    qkv = torch.randn(n, 8 * d, generator=torch.Generator().manual_seed(8)).to(dev)
    q = qkv[:, : 4 * d].view(n, 4, d)
    k = qkv[:, 4 * d : 6 * d].view(n, 2, d)
    v = qkv[:, 6 * d :].view(n, 2, d)
    pos = torch.arange(n, device=dev)
    out = torch.empty(n, 4, d, device=dev)
    got = subset_attention(q, pos, k, v, pos, scale=0.05, backend=backend, out=out)
    assert got is out
    want = subset_attention(
        q.contiguous(), pos, k.contiguous(), v.contiguous(), pos, scale=0.05, backend="torch"
    )
    _close(got, want, torch.float32)
    zero_q = subset_attention(q[:0], pos[:0], k, v, pos, backend=backend)
    assert zero_q.shape == (0, 4, d)


# ---------------------------------------------------------------- validation


def test_validation_errors() -> None:
    q, k, v = _qkv(4, 6, (4, 2), 64, torch.float32)
    qp, kp = torch.arange(4), torch.arange(6)
    with pytest.raises(ValueError, match=r"n_q_heads \(4\) must be a multiple of n_kv_heads \(3\)"):
        subset_attention(q, qp, k[:, :1].expand(6, 3, 64), v[:, :1].expand(6, 3, 64), kp)
    with pytest.raises(ValueError, match=r"k.shape\[2\] must equal head_dim"):
        subset_attention(q, qp, k[..., :32], v, kp)
    with pytest.raises(ValueError, match=r"k.shape\[0\] must equal n_kv"):
        subset_attention(q, qp, k[:5], v, kp)
    with pytest.raises(ValueError, match=r"k.shape\[1\] must equal n_kv_heads"):
        subset_attention(q, qp, k[:, :1], v, kp)
    with pytest.raises(ValueError, match=r"q_positions.shape\[0\] must equal n_q"):
        subset_attention(q, qp[:3], k, v, kp)
    with pytest.raises(ValueError, match=r"kv_positions.shape\[0\] must equal n_kv"):
        subset_attention(q, qp, k, v, kp[:5])
    with pytest.raises(ValueError, match="kv_positions has dtype torch.float32"):
        subset_attention(q, qp, k, v, kp.float())
    with pytest.raises(ValueError, match="k has dtype torch.float16"):
        subset_attention(q, qp, k.half(), v, kp)
    with pytest.raises(ValueError, match="q must have 3 dims"):
        subset_attention(q[0], qp, k, v, kp)
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        subset_attention(q, qp, k, v.tolist(), kp)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="q must have stride 1 in its last dim"):
        subset_attention(q.transpose(1, 2).contiguous().transpose(1, 2), qp, k, v, kp)
    with pytest.raises(ValueError, match="k needs >= 1 head"):
        subset_attention(q, qp, k[:, :0], v[:, :0], kp)
    with pytest.raises(TypeError, match="scale must be a float or None, got str"):
        subset_attention(q, qp, k, v, kp, scale="0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale must be finite"):
        subset_attention(q, qp, k, v, kp, scale=float("inf"))
    with pytest.raises(ValueError, match=r"out.shape\[2\] must equal head_dim_v"):
        subset_attention(q, qp, k, v, kp, out=torch.empty(4, 4, 80))
    with pytest.raises(ValueError, match="out has dtype torch.float16"):
        subset_attention(q, qp, k, v, kp, out=torch.empty(4, 4, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="backend 'gpu' is unknown"):
        subset_attention(q, qp, k, v, kp, backend="gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_device_mismatch_raises() -> None:
    q, k, v = _qkv(4, 6, (4, 2), 64, torch.float32)
    with pytest.raises(ValueError, match="tensors must share one device"):
        subset_attention(q.cuda(), torch.arange(4), k, v, torch.arange(6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_launch_tiles_fit_the_shared_memory_of_small_gpus(dtype: torch.dtype,
                                                          head_dim: int) -> None:
    """An L4 / A10G allows 99 KiB of shared memory per block, an H100 / H200 227 KiB: the
    tiles shrink to fit the first and stay as they are on the second."""
    from sgl_kvext_kernels.subset_attention import _shared_bytes, _tiles

    small, big = 101_376, 232_448
    fitted = _tiles(dtype, 4096, head_dim, head_dim, small)
    assert _shared_bytes(fitted, dtype) <= small and fitted.block_kv >= 16
    assert _tiles(dtype, 4096, head_dim, head_dim, big) == _tiles(dtype, 4096, head_dim, head_dim)


@pytest.mark.parametrize("n_kv", [1, 40, 150])
@pytest.mark.parametrize("n_q", [1, 7, 70])
@pytest.mark.parametrize("dtype", list(TOL))
def test_sorted_kv_stops_at_the_last_query_and_matches(
    device: torch.device, dtype: torch.dtype, n_q: int, n_kv: int
) -> None:
    """``kv_sorted``: the kernel stops where the keys pass the queries (a binary search over
    ascending positions with gaps and repeats); same result as visiting every block."""
    q, k, v = _qkv(n_q, n_kv, (4, 2), 64, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    kv_pos = torch.randint(0, 3, (n_kv,), generator=g).cumsum(0)   # ascending, repeats
    q_pos = torch.randint(-2, int(kv_pos[-1]) + 3, (n_q,), generator=g)
    ref = subset_attention(q, q_pos, k, v, kv_pos, backend="torch")
    args = [t.to(device) for t in (q, q_pos, k, v, kv_pos)]
    tri = subset_attention(*args, backend="triton", kv_sorted=True).cpu()
    _close(tri, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("n_q", [1, 6])
@pytest.mark.parametrize("one_call_keys", [0, 2048], ids=["split", "one-call"])
def test_suffix_attention_over_pieces_in_any_order_equals_causal_sdpa(
    dtype: torch.dtype, heads: tuple[int, int], n_q: int, one_call_keys: int
) -> None:
    from sgl_kvext_kernels.reference.subset_attention import suffix_attention

    q_all, k, v = _qkv(90, 90, heads, 16, dtype, seed=n_q)
    want = _causal_sdpa(q_all, k, v)[-n_q:]
    q = q_all[-n_q:]
    prefix = 90 - (n_q if n_q > 1 else 0)     # a single query's own key goes in a piece
    cuts = [0, 7, 8, 40, 61, prefix]
    pieces = [(k[a:b], v[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    pieces = pieces[3:] + pieces[:1] + [(k[0:0], v[0:0])] + pieces[1:3]   # order and empties
    own = (k[prefix:], v[prefix:]) if n_q > 1 else None
    out = torch.full((n_q, heads[0], 16), float("nan"), dtype=dtype)
    assert suffix_attention(q, pieces, own, 16 ** -0.5, out, one_call_keys) is out
    _close(out, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", HEADS)
def test_one_call_is_taken_up_to_its_key_count_and_ignores_how_keys_are_split(
    dtype: torch.dtype, heads: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to ``one_call_keys`` keys the pieces go end to end into one call: splitting them
    differently changes no bit. One key more, or a mask over its size limit, and the split
    path runs (its own numbers)."""
    from sgl_kvext_kernels.reference import subset_attention as module
    from sgl_kvext_kernels.reference.subset_attention import suffix_attention

    q_all, k, v = _qkv(70, 70, heads, 16, dtype, seed=11)
    q, n = q_all[-5:], 5
    want = _causal_sdpa(q_all, k, v)[-n:]
    own = (k[-n:], v[-n:])

    def run(cuts: list[int], limit: int) -> torch.Tensor:
        pieces = [(k[a:b], v[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
        return suffix_attention(q, pieces, own, 0.25, torch.empty_like(q), limit)

    one = run([0, 65], 70)
    assert torch.equal(one, run([0, 3, 30, 65], 70)) and torch.equal(one, run([0, 64, 65], 70))
    split = run([0, 65], 69)
    assert torch.equal(split, run([0, 65], 0))
    assert not torch.equal(run([0, 3, 30, 65], 69), split)    # split path: pieces do count
    group = heads[0] // heads[1]
    monkeypatch.setattr(module, "_ONE_CALL_MASK_ELEMENTS", group * n * 70 - 1)
    assert torch.equal(run([0, 65], 70), split)
    monkeypatch.setattr(module, "_ONE_CALL_MASK_ELEMENTS", group * n * 70)
    assert torch.equal(run([0, 65], 70), one)
    _close(one, want, dtype)
    _close(split, want, dtype)


def test_suffix_attention_refuses_a_wrong_own_or_no_key() -> None:
    from sgl_kvext_kernels.reference.subset_attention import suffix_attention

    q, k, v = _qkv(3, 10, (4, 2), 8, torch.float32)
    out = torch.empty(3, 4, 8)
    with pytest.raises(ValueError, match="own holds 2 keys for 3 queries"):
        suffix_attention(q, [(k[:8], v[:8])], (k[8:], v[8:]), 0.3, out)
    with pytest.raises(ValueError, match="at least one key"):
        suffix_attention(q, [(k[:0], v[:0])], None, 0.3, out)
