"""gather_kv / scatter_kv: Triton equals the torch reference bit for bit (a copy), scatter then
gather round-trips, untouched slots stay unchanged, and bad input raises a named error."""

from __future__ import annotations

import pytest
import torch

from sgl_kvext_kernels.paged_kv import gather_kv, scatter_kv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LOC_DTYPES = [torch.int32, torch.int64]


def _pool(
    slots: int, n_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(slots, n_heads, head_dim, generator=g).to(dtype)


def _locs(slots: int, n: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    """``n`` unique, unsorted slots out of ``slots``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(slots, generator=g)[:n].to(dtype)


@pytest.mark.parametrize("loc_dtype", LOC_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("n_heads", [1, 3])
@pytest.mark.parametrize("n", [0, 1, 37])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_matches_reference(
    device: torch.device,
    dtype: torch.dtype,
    n: int,
    n_heads: int,
    head_dim: int,
    loc_dtype: torch.dtype,
) -> None:
    pool = _pool(50, n_heads, head_dim, dtype)
    locs = _locs(50, n, loc_dtype)
    want = gather_kv(pool, locs, backend="torch")
    got = gather_kv(pool.to(device), locs.to(device), backend="triton")
    assert got.shape == (n, n_heads, head_dim) and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got.cpu(), want)
    assert torch.equal(want, pool[locs.long()])


@pytest.mark.parametrize("loc_dtype", LOC_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("n_heads", [1, 3])
@pytest.mark.parametrize("n", [0, 1, 37])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_matches_reference_and_round_trips(
    device: torch.device,
    dtype: torch.dtype,
    n: int,
    n_heads: int,
    head_dim: int,
    loc_dtype: torch.dtype,
) -> None:
    pool = _pool(50, n_heads, head_dim, dtype)
    locs = _locs(50, n, loc_dtype)
    rows = _pool(n, n_heads, head_dim, dtype, seed=2)
    want = pool.clone()
    scatter_kv(want, locs, rows, backend="torch")
    got = pool.to(device)
    scatter_kv(got, locs.to(device), rows.to(device), backend="triton")
    assert torch.equal(got.cpu(), want)
    # Round trip: what was written reads back.
    assert torch.equal(gather_kv(got, locs.to(device), backend="triton").cpu(), rows)
    # Untouched slots are unchanged.
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[locs.long()] = False
    assert torch.equal(got.cpu()[untouched], pool[untouched])


@pytest.mark.parametrize(
    ("rows_dtype", "pool_dtype"),
    [
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.float16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ],
)
def test_scatter_casts_rows_to_pool_dtype(
    device: torch.device, rows_dtype: torch.dtype, pool_dtype: torch.dtype
) -> None:
    pool = _pool(40, 2, 80, pool_dtype)
    locs = _locs(40, 17, torch.int64)
    rows = _pool(17, 2, 80, rows_dtype, seed=3)
    want = pool.clone()
    scatter_kv(want, locs, rows, backend="torch")
    assert torch.equal(want[locs], rows.to(pool_dtype))  # round to nearest, like Tensor.to
    got = pool.to(device)
    scatter_kv(got, locs.to(device), rows.to(device), backend="triton")
    if device.type == "cuda" or pool_dtype != torch.bfloat16:
        assert torch.equal(got.cpu(), want)
    else:
        # Triton's interpreter truncates float32 -> bfloat16 (compiled Triton rounds to
        # nearest even, like torch): allow one bfloat16 ulp there.
        torch.testing.assert_close(got.cpu().float(), want.float(), rtol=2**-7, atol=0.0)


def test_gather_allows_repeated_slots_and_out(device: torch.device) -> None:
    pool = _pool(10, 2, 64, torch.float16).to(device)
    locs = torch.tensor([3, 3, 0, 9, 3], device=device)
    out = torch.empty(5, 2, 64, dtype=torch.float16, device=device)
    got = gather_kv(pool, locs, backend="triton", out=out)
    assert got is out
    assert torch.equal(out, pool[locs])
    assert torch.equal(gather_kv(pool, locs, backend="auto"), pool[locs])


def test_scatter_empty_is_noop(device: torch.device) -> None:
    pool = _pool(10, 2, 64, torch.float32).to(device)
    before = pool.clone()
    for backend in ("torch", "triton"):
        scatter_kv(
            pool,
            torch.empty(0, dtype=torch.int64, device=device),
            torch.empty(0, 2, 64, device=device),
            backend=backend,
        )
    assert torch.equal(pool, before)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", [-1, 10, 1000])
def test_out_of_range_locs_raise(device: torch.device, backend: str, bad: int) -> None:
    pool = _pool(10, 2, 64, torch.float32).to(device)
    locs = torch.tensor([0, bad, 4], device=device)
    with pytest.raises(IndexError, match=r"locs must lie in \[0, 10\).*\[-?\d+, \d+\]"):
        gather_kv(pool, locs, backend=backend)
    with pytest.raises(IndexError, match=r"locs must lie in \[0, 10\)"):
        scatter_kv(pool, locs, torch.zeros(3, 2, 64, device=device), backend=backend)


@pytest.mark.parametrize("loc_dtype", LOC_DTYPES)
def test_duplicate_locs_raise_on_scatter(device: torch.device, loc_dtype: torch.dtype) -> None:
    pool = _pool(10, 2, 64, torch.float32).to(device)
    locs = torch.tensor([5, 1, 5], dtype=loc_dtype, device=device)
    before = pool.clone()
    with pytest.raises(ValueError, match="locs must be unique.*slot 5"):
        scatter_kv(pool, locs, torch.zeros(3, 2, 64, device=device), backend="triton")
    assert torch.equal(pool, before)


def test_wrong_shapes_and_types_raise() -> None:
    pool = _pool(10, 2, 64, torch.float32)
    locs = torch.tensor([1, 2])
    rows = torch.zeros(2, 2, 64)
    with pytest.raises(TypeError, match="pool must be a torch.Tensor"):
        gather_kv(pool.numpy(), locs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pool must have 3 dims"):
        gather_kv(pool.view(10, 128), locs)
    with pytest.raises(ValueError, match="pool has dtype torch.int64"):
        gather_kv(pool.long(), locs)
    with pytest.raises(ValueError, match="pool must be contiguous"):
        scatter_kv(pool.transpose(0, 1), locs, rows)
    with pytest.raises(ValueError, match="locs has dtype torch.float32"):
        gather_kv(pool, locs.float())
    with pytest.raises(ValueError, match="locs must have 1 dims"):
        gather_kv(pool, locs.view(1, 2))
    with pytest.raises(ValueError, match="locs must be contiguous"):
        gather_kv(pool, torch.arange(4)[::2])
    with pytest.raises(ValueError, match=r"rows.shape\[0\] must equal len\(locs\)"):
        scatter_kv(pool, locs, torch.zeros(3, 2, 64))
    with pytest.raises(ValueError, match=r"rows.shape\[1\] must equal pool n_heads"):
        scatter_kv(pool, locs, torch.zeros(2, 1, 64))
    with pytest.raises(ValueError, match=r"rows.shape\[2\] must equal pool head_dim"):
        scatter_kv(pool, locs, torch.zeros(2, 2, 80))
    with pytest.raises(ValueError, match="rows must be contiguous"):
        scatter_kv(pool, locs, torch.zeros(2, 64, 2).transpose(1, 2))
    with pytest.raises(ValueError, match="rows has dtype torch.int32"):
        scatter_kv(pool, locs, rows.int())
    with pytest.raises(ValueError, match="out has dtype torch.float16"):
        gather_kv(pool, locs, out=rows.half())
    with pytest.raises(ValueError, match=r"out.shape\[2\] must equal pool head_dim"):
        gather_kv(pool, locs, out=torch.zeros(2, 2, 80))
    with pytest.raises(ValueError, match="pool needs n_heads >= 1"):
        gather_kv(torch.zeros(10, 0, 64), locs)
    with pytest.raises(ValueError, match="backend 'cuda' is unknown"):
        gather_kv(pool, locs, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_device_mismatch_raises() -> None:
    pool = _pool(10, 2, 64, torch.float32).cuda()
    with pytest.raises(ValueError, match="tensors must share one device"):
        gather_kv(pool, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="tensors must share one device"):
        scatter_kv(pool, torch.tensor([1, 2], device="cuda"), torch.zeros(2, 2, 64))
