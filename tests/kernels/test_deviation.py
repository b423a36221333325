"""KV deviation: Triton kernel vs torch reference; top-deviation selection semantics."""

from __future__ import annotations

import pytest
import torch

from sgl_kvext_kernels.deviation import DeviationSelection, kv_deviation, select_top_deviation
from sgl_kvext_kernels.reference.deviation import kv_deviation_ref

# Both sides accumulate in float32 from the same inputs; only the summation order differs.
TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_tokens", [1, 5, 130])
@pytest.mark.parametrize("n_heads", [1, 3])
@pytest.mark.parametrize("head_dim", [64, 40])
def test_triton_matches_reference(
    device: torch.device, dtype: torch.dtype, n_tokens: int, n_heads: int, head_dim: int
) -> None:
    g = torch.Generator().manual_seed(n_tokens * 100 + n_heads * 10 + head_dim)
    cached = torch.randn(n_tokens, n_heads, head_dim, generator=g).to(dtype).to(device)
    fresh = (cached.float() + 0.3 * torch.randn(cached.shape, generator=g).to(device)).to(dtype)
    got = kv_deviation(cached, fresh, backend="triton")
    assert got.dtype == torch.float32 and got.shape == (n_tokens,)
    torch.testing.assert_close(got, kv_deviation_ref(cached, fresh), rtol=TOL[dtype], atol=1e-5)
    torch.testing.assert_close(
        kv_deviation(cached, fresh, backend="torch"), got, rtol=1e-5, atol=1e-5
    )


def test_long_rows_loop_over_chunks(device: torch.device) -> None:
    # 5 * 120 = 600 elements per token: three 256-wide chunks, the last one masked.
    g = torch.Generator().manual_seed(7)
    cached = torch.randn(19, 5, 120, generator=g).to(device)
    fresh = torch.randn(19, 5, 120, generator=g).to(device)
    got = kv_deviation(cached, fresh, backend="triton")
    torch.testing.assert_close(got, kv_deviation_ref(cached, fresh), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_known_deviations(device: torch.device, backend: str) -> None:
    cached = torch.zeros(6, 3, 40, dtype=torch.float16, device=device)
    fresh = cached.clone()
    fresh[1, 2, 39] = 3.0  # 9
    fresh[4, 0, :] = 1.0  # 40
    fresh[5, 1, 7] = -2.0  # 4
    # Strided rows (every other token of a bigger buffer): only the token stride differs.
    fresh_strided = torch.zeros(12, 3, 40, dtype=torch.float16, device=device)[::2]
    fresh_strided.copy_(fresh)
    for f in (fresh, fresh_strided):
        dev = kv_deviation(cached, f, backend=backend)
        assert dev.tolist() == [0.0, 9.0, 0.0, 0.0, 40.0, 4.0]
    sel = select_top_deviation(dev, ratio=0.5)
    assert sel.indices.tolist() == [1, 4, 5] and sel.count == 3
    assert sel.indices.dtype == torch.int64 and sel.indices.device == dev.device
    # fp16 overflow would be inf; float32 accumulation stays finite.
    big = torch.full((2, 2, 64), 60000.0, dtype=torch.float16, device=device)
    huge = kv_deviation(-big, big, backend=backend)
    torch.testing.assert_close(huge, torch.full((2,), 128 * 120000.0**2, device=device))
    empty = torch.empty(0, 3, 40, device=device)
    assert kv_deviation(empty, empty, backend=backend).shape == (0,)


def test_selection_counts() -> None:
    dev = torch.arange(130, dtype=torch.float32).flip(0)  # token i has deviation 129 - i
    assert select_top_deviation(dev, 0.0).indices.tolist() == [0]  # min_tokens=1
    assert select_top_deviation(dev, 0.0, min_tokens=0).count == 0
    assert select_top_deviation(dev, 0.0, min_tokens=0).indices.shape == (0,)
    assert torch.equal(select_top_deviation(dev, 1.0).indices, torch.arange(130))
    sel = select_top_deviation(dev, 0.15)  # ceil(19.5)
    assert sel.count == 20 and sel.indices.tolist() == list(range(20))
    assert select_top_deviation(dev, 0.15, min_tokens=50).count == 50
    assert select_top_deviation(dev, 0.15, min_tokens=500).count == 130
    # 0.1 * 30 is 3.0000000000000004 in floating point: still 3 tokens.
    assert select_top_deviation(dev[:30], 0.1).count == 3
    assert select_top_deviation(dev[:1], 0.01).count == 1
    empty = select_top_deviation(torch.empty(0), 0.5)
    assert empty.count == 0 and empty.indices.dtype == torch.int64


def test_selection_respects_candidates() -> None:
    dev = torch.tensor([9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0])
    candidates = torch.tensor([False, True, False, True, True, True, False, True])
    sel = select_top_deviation(dev, 0.4, candidates=candidates)  # ceil(0.4 * 5) = 2
    assert isinstance(sel, DeviationSelection) and sel.count == 2
    assert sel.indices.tolist() == [4, 7]
    assert select_top_deviation(dev, 1.0, candidates=candidates).indices.tolist() == [1, 3, 4, 5, 7]
    none = torch.zeros(8, dtype=torch.bool)
    assert select_top_deviation(dev, 0.5, candidates=none).count == 0  # min(min_tokens, 0)
    assert select_top_deviation(dev, 0.0, min_tokens=3, candidates=candidates).indices.tolist() == [
        4,
        5,
        7,
    ]


def test_selection_ties_prefer_lower_index() -> None:
    dev = torch.tensor([1.0, 5.0, 5.0, 0.0, 5.0, 5.0, 2.0])
    assert select_top_deviation(dev, 2 / 7).indices.tolist() == [1, 2]
    assert select_top_deviation(dev, 3 / 7).indices.tolist() == [1, 2, 4]
    cand = torch.tensor([True, False, True, True, True, True, True])
    assert select_top_deviation(dev, 0.0, min_tokens=2, candidates=cand).indices.tolist() == [2, 4]
    flat = torch.zeros(1000)
    assert torch.equal(select_top_deviation(flat, 0.1).indices, torch.arange(100))
    nan = torch.tensor([1.0, float("nan"), 3.0])
    assert select_top_deviation(nan, 0.0).indices.tolist() == [1]  # NaN ranks highest


def test_kv_deviation_validation() -> None:
    a = torch.randn(4, 2, 8)
    with pytest.raises(TypeError, match="cached must be a torch.Tensor, got ndarray"):
        kv_deviation(a.numpy(), a)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"fresh must have 3 dims, got shape \(4, 16\)"):
        kv_deviation(a, a.reshape(4, 16))
    with pytest.raises(ValueError, match="cached has dtype torch.int64; allowed"):
        kv_deviation(a.long(), a.long())
    with pytest.raises(ValueError, match="fresh has dtype torch.float16; allowed: torch.float32"):
        kv_deviation(a, a.half())
    with pytest.raises(ValueError, match=r"fresh.shape\[1\] must equal cached n_heads \(2\)"):
        kv_deviation(a, a[:, :1])
    with pytest.raises(ValueError, match="backend 'gpu' is unknown"):
        kv_deviation(a, a, backend="gpu")
    with pytest.raises(ValueError, match="fresh must have dense rows"):
        kv_deviation(a, a.transpose(1, 2).contiguous().transpose(1, 2), backend="triton")


def test_select_validation() -> None:
    dev = torch.rand(5)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\], got 1.5"):
        select_top_deviation(dev, 1.5)
    with pytest.raises(ValueError, match="ratio must be in"):
        select_top_deviation(dev, float("nan"))
    with pytest.raises(TypeError, match="ratio must be a real number, got str"):
        select_top_deviation(dev, "0.5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_tokens must be >= 0, got -1"):
        select_top_deviation(dev, 0.5, min_tokens=-1)
    with pytest.raises(TypeError, match="min_tokens must be an int, got float"):
        select_top_deviation(dev, 0.5, min_tokens=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"deviation must have 1 dims, got shape \(5, 1\)"):
        select_top_deviation(dev[:, None], 0.5)
    with pytest.raises(ValueError, match="candidates has dtype torch.int64; allowed: torch.bool"):
        select_top_deviation(dev, 0.5, candidates=torch.ones(5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"candidates.shape\[0\] must equal deviation.shape\[0\]"):
        select_top_deviation(dev, 0.5, candidates=torch.ones(4, dtype=torch.bool))
