"""RoPE re-rotation: Triton kernel vs torch reference, rotation semantics, HF config parsing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sgl_kvext_kernels.reference.rope import apply_rope, rerotate_k_ref
from sgl_kvext_kernels.rope import Llama3RopeScaling, RopeConfig, inv_freq, rerotate_k

LLAMA3 = Llama3RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)
LLAMA3_PARAMS = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# (atol, rtol) for one output element: the kernel and the reference round once to the dtype.
TOL = {
    torch.float32: (2e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def _positions(n: int, high: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n,), generator=g), torch.randint(0, high, (n,), generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_tokens", [1, 37])
@pytest.mark.parametrize("n_heads", [1, 3])
@pytest.mark.parametrize("dims", [(64, 64), (64, 32), (64, 48), (80, 80)])
@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["plain", "llama3"])
def test_triton_matches_reference(
    device: torch.device,
    dtype: torch.dtype,
    n_tokens: int,
    n_heads: int,
    dims: tuple[int, int],
    scaling: Llama3RopeScaling | None,
) -> None:
    head_dim, rotary_dim = dims
    cfg = RopeConfig(head_dim=head_dim, rotary_dim=rotary_dim, theta=500000.0, scaling=scaling)
    g = torch.Generator().manual_seed(n_tokens * 7 + n_heads)
    k = torch.randn(n_tokens, n_heads, head_dim, generator=g).to(dtype).to(device)
    old, new = (p.to(device) for p in _positions(n_tokens, 20000, seed=head_dim + rotary_dim))
    got = rerotate_k(k, old, new, cfg, backend="triton")
    want = rerotate_k(k, old, new, cfg, backend="torch")
    assert got.dtype == dtype and got.shape == k.shape
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    # Pass-through dims are copied bit for bit.
    assert torch.equal(got[..., rotary_dim:], k[..., rotary_dim:])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dims", [(64, 64), (64, 32)])
def test_rerotation_equals_rope_at_new_positions(
    device: torch.device, backend: str, dims: tuple[int, int]
) -> None:
    cfg = RopeConfig(head_dim=dims[0], rotary_dim=dims[1], theta=100000.0, scaling=LLAMA3)
    x = torch.randn(24, 3, dims[0], generator=torch.Generator().manual_seed(1)).to(device)
    old, new = (p.to(device) for p in _positions(24, 256, seed=2))
    new[:4] = old[:4] - torch.tensor([1, 7, 0, 100], device=device).clamp(max=old[:4])  # new <= old
    new[4] = old[4] + 200
    assert (new < old).any() and (new > old).any()
    moved = rerotate_k(apply_rope(x, old, cfg), old, new, cfg, backend=backend)
    # Both sides round float32 angles of positions < 512: error ~ 512 * 2**-24 * |x|.
    torch.testing.assert_close(moved, apply_rope(x, new, cfg), atol=2e-4, rtol=1e-4)
    back = rerotate_k(moved, new, old, cfg, backend=backend)
    torch.testing.assert_close(back, apply_rope(x, old, cfg), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_in_place_out_int32_positions(device: torch.device, backend: str) -> None:
    cfg = RopeConfig(head_dim=64, rotary_dim=48, theta=10000.0)
    k = torch.randn(9, 2, 64, generator=torch.Generator().manual_seed(3)).to(device)
    old, new = (p.to(device, torch.int32) for p in _positions(9, 1000, seed=4))
    want = rerotate_k_ref(k, old.long(), new.long(), cfg)
    buf = k.clone()
    result = rerotate_k(buf, old, new, cfg, backend=backend, out=buf)
    assert result.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf, want, atol=2e-5, rtol=1e-5)
    same = rerotate_k(k, old, old, cfg, backend=backend)  # zero delta: identity
    torch.testing.assert_close(same, k, atol=0, rtol=0)
    empty = torch.empty(0, 2, 64, device=device)
    pos = torch.empty(0, dtype=torch.int64, device=device)
    assert rerotate_k(empty, pos, pos, cfg, backend=backend).shape == (0, 2, 64)


def test_smollm2_config_and_transformers_rope(device: torch.device) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    hf = transformers.LlamaConfig(
        hidden_size=576, num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0
    )
    cfg = RopeConfig.from_hf_config(hf)
    assert cfg == RopeConfig(head_dim=64, rotary_dim=64, theta=100000.0, scaling=None)
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(11, 9, 64, generator=g), torch.randn(11, 3, 64, generator=g)
    pos = torch.arange(3, 14)
    cos, sin = LlamaRotaryEmbedding(hf)(q, pos[None])
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    torch.testing.assert_close(apply_rope(q, pos, cfg), q_hf[0].transpose(0, 1))
    torch.testing.assert_close(apply_rope(k, pos, cfg), k_hf[0].transpose(0, 1))
    # The KV-cache layout of SmolLM2 (3 kv heads) through the kernel.
    k_rot, new = apply_rope(k, pos, cfg).to(device), (pos + 40).to(device)
    got = rerotate_k(k_rot, pos.to(device), new, cfg, backend="triton")
    torch.testing.assert_close(got, apply_rope(k, pos + 40, cfg).to(device), atol=1e-4, rtol=1e-4)


def test_inv_freq_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    plain = transformers.LlamaConfig(
        hidden_size=576, num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0
    )
    want, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(plain)
    got = inv_freq(RopeConfig.from_hf_config(plain))
    assert got.dtype == torch.float32 and got.shape == (32,)
    assert torch.equal(got, want)
    for partial in (1.0, 0.5):
        params = {**LLAMA3_PARAMS, "partial_rotary_factor": partial}
        hf = transformers.LlamaConfig(
            hidden_size=1024, num_attention_heads=8, max_position_embeddings=131072,
            rope_parameters=params,
        )  # fmt: skip
        want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
        cfg = RopeConfig.from_hf_config(hf)
        assert cfg.rotary_dim == int(128 * partial) and cfg.scaling == LLAMA3
        assert torch.equal(inv_freq(cfg), want)
    # The scaling is not a no-op for these parameters.
    assert not torch.equal(inv_freq(cfg), inv_freq(RopeConfig(128, 64, 500000.0)))


def test_from_hf_config_layouts() -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(
        hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
        rope_parameters=LLAMA3_PARAMS,
    )  # fmt: skip
    assert RopeConfig.from_hf_config(hf) == RopeConfig(128, 128, 500000.0, LLAMA3)
    # transformers 4.x layout; llama3 without original_max_position_embeddings falls back to
    # max_position_embeddings, "type" is the old name of "rope_type", head_dim wins.
    old = SimpleNamespace(
        hidden_size=256, num_attention_heads=4, head_dim=80, max_position_embeddings=8192,
        rope_theta=10000, partial_rotary_factor=0.5,
        rope_scaling={"type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4},
    )  # fmt: skip
    assert RopeConfig.from_hf_config(old) == RopeConfig(80, 40, 10000.0, LLAMA3)
    old.rope_scaling = None
    assert RopeConfig.from_hf_config(old).scaling is None


@pytest.mark.parametrize("rope_type", ["yarn", "linear", "dynamic", "longrope"])
def test_from_hf_config_refuses_other_rope_types(rope_type: str) -> None:
    params = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 4.0}
    hf = SimpleNamespace(hidden_size=256, num_attention_heads=4, rope_parameters=params)
    msg = f"rope_type '{rope_type}' is not supported; supported: default, llama3"
    with pytest.raises(ValueError, match=msg):
        RopeConfig.from_hf_config(hf)


def test_from_hf_config_real_yarn_refused() -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0},
    )
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        RopeConfig.from_hf_config(hf)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"head_dim": 0, "rotary_dim": 2, "theta": 1e4}, "head_dim must be an int > 0"),
        ({"head_dim": 64, "rotary_dim": 33, "theta": 1e4}, "rotary_dim must be an even int"),
        ({"head_dim": 64, "rotary_dim": 80, "theta": 1e4}, r"rotary_dim .* \(0, head_dim=64\]"),
        ({"head_dim": 64, "rotary_dim": 64, "theta": 0.0}, "theta must be a finite number > 0"),
    ],
)
def test_config_validation(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RopeConfig(**kwargs)  # type: ignore[arg-type]


def test_llama3_scaling_validation() -> None:
    with pytest.raises(ValueError, match="high_freq_factor must be > low_freq_factor"):
        Llama3RopeScaling(8.0, 4.0, 4.0, 8192)
    with pytest.raises(ValueError, match="original_max_position_embeddings must be an int > 0"):
        Llama3RopeScaling(8.0, 1.0, 4.0, 0)


def test_rerotate_validation() -> None:
    cfg = RopeConfig(head_dim=64, rotary_dim=64, theta=1e4)
    k = torch.randn(4, 2, 64)
    pos = torch.arange(4)
    cases: list[tuple[type[Exception], str, dict[str, object]]] = [
        (TypeError, "k must be a torch.Tensor, got list", {"k": [1.0]}),
        (ValueError, r"k must have 3 dims, got shape \(4, 128\)", {"k": k.reshape(4, 128)}),
        (ValueError, "k has dtype torch.int32; allowed", {"k": k.int()}),
        (ValueError, "k must be contiguous", {"k": k.transpose(0, 1)}),
        (ValueError, r"k.shape\[2\] must equal cfg.head_dim \(32\)",
         {"cfg": RopeConfig(32, 32, 1e4)}),
        (ValueError, r"old_positions.shape\[0\] must equal k.shape\[0\] \(4\), got shape \(3,\)",
         {"old": pos[:3]}),
        (ValueError, "new_positions has dtype torch.float32; allowed: torch.int32, torch.int64",
         {"new": pos.float()}),
        (ValueError, "backend 'cuda' is unknown; allowed: auto, triton, torch",
         {"backend": "cuda"}),
        (ValueError, "out has dtype torch.float16", {"out": k.half()}),
        (ValueError, r"out must have k's shape \(4, 2, 64\), got \(4, 1, 64\)",
         {"out": k[:, :1].contiguous()}),
        (TypeError, "cfg must be a RopeConfig, got dict", {"cfg": {"head_dim": 64}}),
    ]  # fmt: skip
    for exc, match, override in cases:
        args: dict[str, object] = {"k": k, "old": pos, "new": pos, "cfg": cfg, "backend": "torch"}
        args.update(override)
        with pytest.raises(exc, match=match):
            rerotate_k(
                args["k"], args["old"], args["new"], args["cfg"],  # type: ignore[arg-type]
                backend=args["backend"], out=args.get("out"),  # type: ignore[arg-type]
            )  # fmt: skip
