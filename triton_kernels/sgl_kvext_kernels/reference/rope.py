"""Pure-torch RoPE (neox / rotate-half layout): the oracle for the kernel and the CPU path.

Inputs are assumed validated by :func:`sgl_kvext_kernels.rope.rerotate_k`.
"""

from __future__ import annotations

import torch

from sgl_kvext_kernels.rope import RopeConfig, inv_freq


def _rotate(x: torch.Tensor, angle: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    """Rotate ``x`` [n_tokens, n_heads, head_dim] by ``angle`` [n_tokens, rotary_dim // 2]
    (float32); the result is float32, pass-through dims copied."""
    half = cfg.rotary_dim // 2
    xf = x.float()
    cos = torch.cos(angle)[:, None, :]
    sin = torch.sin(angle)[:, None, :]
    x1 = xf[..., :half]
    x2 = xf[..., half : cfg.rotary_dim]
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    return torch.cat((y1, y2, xf[..., cfg.rotary_dim :]), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    """RoPE as the model applies it to K (or Q).

    Parameters
    ----------
    x : Tensor [n_tokens, n_heads, head_dim]
        Unrotated keys; any float dtype.
    positions : Tensor [n_tokens]
        Integer positions.
    cfg : RopeConfig

    Returns
    -------
    Tensor [n_tokens, n_heads, head_dim]
        Rotated copy in ``x.dtype`` (angle ``float32(position) * inv_freq``, as transformers).
    """
    freq = inv_freq(cfg).to(x.device)
    angle = positions.to(torch.float32)[:, None] * freq[None, :]
    return _rotate(x, angle, cfg).to(x.dtype)


def rerotate_k_ref(
    k: torch.Tensor,
    old_positions: torch.Tensor,
    new_positions: torch.Tensor,
    cfg: RopeConfig,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference for :func:`sgl_kvext_kernels.rope.rerotate_k` (same arguments and result)."""
    # int64 delta first, then float32, like the kernel.
    delta = (new_positions.to(torch.int64) - old_positions.to(torch.int64)).to(torch.float32)
    freq = inv_freq(cfg).to(k.device)
    rotated = _rotate(k, delta[:, None] * freq[None, :], cfg)
    if out is None:
        return rotated.to(k.dtype)
    # ``rotated`` is a fresh tensor, so ``out`` aliasing ``k`` is safe.
    return out.copy_(rotated)
