"""RoPE configuration and re-rotation of cached keys to new positions (CacheBlend).

A key cached at position ``old`` holds ``R(old) k``; the model expects ``R(new) k``. Since
rotations compose, ``R(new) R(old)^-1 = R(new - old)``: one rotation by the position delta
moves the cached key, without knowing the unrotated key. Layout is neox / HF "rotate_half":
dim ``i`` pairs with ``i + rotary_dim // 2``; dims ``[rotary_dim, head_dim)`` pass through.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from sgl_kvext_kernels._validate import (
    check_dim,
    check_same_device,
    check_tensor,
    resolve_backend,
)

SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "llama3")
_POSITION_DTYPES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)
_BLOCK_T = 16  # tokens per program


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1 frequency scaling (HF ``rope_type: llama3``); same names as the HF config."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"factor must be a finite number > 0, got {self.factor!r}")
        if not (math.isfinite(self.low_freq_factor) and self.low_freq_factor > 0):
            raise ValueError(f"low_freq_factor must be > 0, got {self.low_freq_factor!r}")
        # The smoothing divides by (high - low).
        if not (
            math.isfinite(self.high_freq_factor) and self.high_freq_factor > self.low_freq_factor
        ):
            raise ValueError(
                f"high_freq_factor must be > low_freq_factor ({self.low_freq_factor}), "
                f"got {self.high_freq_factor!r}"
            )
        ctx = self.original_max_position_embeddings
        if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx <= 0:
            raise ValueError(f"original_max_position_embeddings must be an int > 0, got {ctx!r}")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention layer.

    Attributes
    ----------
    head_dim : int
        Size of one head.
    rotary_dim : int
        Even, ``0 < rotary_dim <= head_dim``: the first ``rotary_dim`` dims rotate.
    theta : float
        Base wavelength (HF ``rope_theta``).
    scaling : Llama3RopeScaling | None
        ``None`` for plain RoPE.
    """

    head_dim: int
    rotary_dim: int
    theta: float
    scaling: Llama3RopeScaling | None = None

    def __post_init__(self) -> None:
        hd, rd = self.head_dim, self.rotary_dim
        if isinstance(hd, bool) or not isinstance(hd, int) or hd <= 0:
            raise ValueError(f"head_dim must be an int > 0, got {hd!r}")
        if isinstance(rd, bool) or not isinstance(rd, int) or not 0 < rd <= hd or rd % 2:
            raise ValueError(f"rotary_dim must be an even int in (0, head_dim={hd}], got {rd!r}")
        if not (math.isfinite(self.theta) and self.theta > 0):
            raise ValueError(f"theta must be a finite number > 0, got {self.theta!r}")
        if self.scaling is not None and not isinstance(self.scaling, Llama3RopeScaling):
            raise TypeError(
                f"scaling must be Llama3RopeScaling or None, got {type(self.scaling).__name__}"
            )

    @classmethod
    def from_hf_config(cls, cfg: Any) -> RopeConfig:
        """Read RoPE settings from a transformers ``PretrainedConfig`` (4.x or 5.x layout).

        Raises ``ValueError`` for a rope type other than default / llama3, per-layer rope
        parameters, or a missing theta.
        """
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        # transformers 5 keeps everything in ``rope_parameters``; 4.x uses ``rope_theta`` and
        # ``rope_scaling`` (which 5.x still exposes as an alias of ``rope_parameters``).
        params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if not isinstance(params, Mapping):
            raise ValueError(f"rope parameters must be a mapping, got {type(params).__name__}")
        if any(isinstance(v, Mapping) for v in params.values()):
            raise ValueError(f"per-layer rope parameters are not supported, got {sorted(params)}")
        rope_type = params.get("rope_type", params.get("type")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_type {rope_type!r} is not supported; supported: "
                + ", ".join(SUPPORTED_ROPE_TYPES)
            )
        theta = params.get("rope_theta")
        for attr in ("rope_theta", "default_theta"):
            if theta is None:
                theta = getattr(cfg, attr, None)
        if theta is None:
            raise ValueError("config has no rope_theta (neither attribute nor rope_parameters)")
        factor = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
        rotary_dim = int(head_dim * (1.0 if factor is None else factor))
        scaling = None
        if rope_type == "llama3":
            # As transformers' standardize_rope_params: fall back to max_position_embeddings.
            ctx = params.get("original_max_position_embeddings")
            if ctx is None:
                ctx = cfg.max_position_embeddings
            scaling = Llama3RopeScaling(
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(ctx),
            )
        return cls(
            head_dim=int(head_dim), rotary_dim=rotary_dim, theta=float(theta), scaling=scaling
        )


def inv_freq(cfg: RopeConfig) -> torch.Tensor:
    """Inverse frequencies, float32 on CPU, shape ``[rotary_dim // 2]``.

    Same float32 operations as transformers (``_compute_default_rope_parameters`` /
    ``_compute_llama3_parameters``), so the values match bit for bit.
    """
    dim = cfg.rotary_dim
    steps = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu")
    freq = 1.0 / (cfg.theta ** (steps.float() / dim))
    s = cfg.scaling
    if s is None:
        return freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / freq
    # Long wavelengths (> low_wavelen) are divided by factor, short ones (< high_wavelen) kept,
    # the band in between interpolated.
    scaled = torch.where(wavelen > low_wavelen, freq / s.factor, freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


@lru_cache(maxsize=64)
def _inv_freq_on(cfg: RopeConfig, device: torch.device) -> torch.Tensor:
    """``inv_freq(cfg)`` on ``device``, cached (read-only by convention)."""
    return inv_freq(cfg).to(device)


def rerotate_k(
    k: torch.Tensor,
    old_positions: torch.Tensor,
    new_positions: torch.Tensor,
    cfg: RopeConfig,
    *,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Re-rotate cached keys from ``old_positions`` to ``new_positions``.

    Parameters
    ----------
    k : Tensor [n_tokens, n_kv_heads, head_dim]
        Contiguous float32 / float16 / bfloat16 keys, RoPE already applied at ``old_positions``.
    old_positions, new_positions : Tensor [n_tokens]
        int32 or int64, on ``k``'s device.
    cfg : RopeConfig
        ``cfg.head_dim`` must equal ``k.shape[2]``.
    backend : {"auto", "triton", "torch"}
        ``auto``: Triton on CUDA, the torch reference elsewhere.
    out : Tensor [n_tokens, n_kv_heads, head_dim], optional
        Contiguous, same dtype and device as ``k``; may be ``k`` itself (in place).

    Returns
    -------
    Tensor [n_tokens, n_kv_heads, head_dim]
        ``k`` rotated by ``(new - old) * inv_freq`` (float32 math, ``k.dtype`` result);
        ``out`` when given.
    """
    if not isinstance(cfg, RopeConfig):
        raise TypeError(f"cfg must be a RopeConfig, got {type(cfg).__name__}")
    k = check_tensor("k", k, ndim=3, contiguous=True)
    old_positions = check_tensor("old_positions", old_positions, ndim=1, dtypes=_POSITION_DTYPES)
    new_positions = check_tensor("new_positions", new_positions, ndim=1, dtypes=_POSITION_DTYPES)
    check_dim("k", k, 2, cfg.head_dim, "cfg.head_dim")
    check_dim("old_positions", old_positions, 0, k.shape[0], "k.shape[0]")
    check_dim("new_positions", new_positions, 0, k.shape[0], "k.shape[0]")
    device = check_same_device(k=k, old_positions=old_positions, new_positions=new_positions)
    if out is not None:
        out = check_tensor("out", out, ndim=3, dtypes=(k.dtype,), contiguous=True)
        check_same_device(k=k, out=out)
        if out.shape != k.shape:
            raise ValueError(f"out must have k's shape {tuple(k.shape)}, got {tuple(out.shape)}")
    if resolve_backend(backend, device) == "torch":
        from sgl_kvext_kernels.reference.rope import rerotate_k_ref

        return rerotate_k_ref(k, old_positions, new_positions, cfg, out=out)

    import triton

    from sgl_kvext_kernels.jit.rope import rerotate_k_kernel

    result = torch.empty_like(k) if out is None else out
    n_tokens, n_heads, _ = k.shape
    if n_tokens == 0 or n_heads == 0:
        return result
    half = cfg.rotary_dim // 2
    n_pass = cfg.head_dim - cfg.rotary_dim
    grid = (triton.cdiv(n_tokens, _BLOCK_T), n_heads)
    rerotate_k_kernel[grid](
        k,
        result,
        old_positions.contiguous(),
        new_positions.contiguous(),
        _inv_freq_on(cfg, device),
        n_tokens,
        k.stride(0),
        k.stride(1),
        result.stride(0),
        result.stride(1),
        HALF_ROT=half,
        N_PASS=n_pass,
        BLOCK_T=_BLOCK_T,
        BLOCK_R=triton.next_power_of_2(half),
        BLOCK_P=triton.next_power_of_2(max(n_pass, 1)),
    )
    return result
