"""A randomly initialised Llama-shaped model as a :class:`~sgl_kvext.blend.LayerOps`, in
plain torch on an explicit device (no SGLang, no transformers, no checkpoint).

It exists to run the blend where the served model cannot: on a GPU machine without SGLang
(``bench/gpu/checks.py``) and under ``torch.set_default_device("meta")`` in the device
placement tests, where any tensor made without an explicit device fails loudly. Its layers are
a Llama's (RMSNorm, GQA attention with rotate-half RoPE from the kernels' ``inv_freq``,
SwiGLU MLP, tied LM head); its weights are random, so only device placement, shapes and the
blend's arithmetic are meaningful, never its tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sgl_kvext.blend.layer_ops import QKV
from sgl_kvext_kernels import RopeConfig, inv_freq


class RandomLlamaOps:
    """Llama-shaped layers with seeded random weights on ``device`` (every tensor it makes
    names its device)."""

    def __init__(self, *, layers: int = 2, hidden: int = 256, q_heads: int = 4,
                 kv_heads: int = 2, head_dim: int = 64, intermediate: int = 512,
                 vocab: int = 1000, theta: float = 10000.0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        self.device, self._dtype = torch.device(device), dtype
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.rope = RopeConfig(head_dim, head_dim, theta)
        self._inv_freq = inv_freq(self.rope).to(self.device)
        g = torch.Generator(device=self.device).manual_seed(seed)

        def weight(*shape: int, std: float) -> torch.Tensor:
            w = torch.randn(*shape, generator=g, device=self.device, dtype=torch.float32)
            return (w * std).to(dtype)

        self.embed_w = weight(vocab, hidden, std=1.0)
        q, kv = q_heads * head_dim, kv_heads * head_dim
        self._layers = [{"qkv": weight(hidden, q + 2 * kv, std=hidden ** -0.5),
                         "o": weight(q, hidden, std=q ** -0.5),
                         "up": weight(hidden, 2 * intermediate, std=hidden ** -0.5),
                         "down": weight(intermediate, hidden, std=intermediate ** -0.5)}
                        for _ in range(layers)]
        self._split = [q, kv, kv]

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed_w)

    def qkv(self, layer: int, h: torch.Tensor, positions: torch.Tensor) -> QKV:
        t = h.shape[0]
        q, k, v = (_rms(h) @ self._layers[layer]["qkv"]).split(self._split, dim=-1)
        angle = positions.to(torch.float32)[:, None] * self._inv_freq[None, :]   # [T, D/2]
        cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
        return QKV(self._rotate(q.reshape(t, self.q_heads, self.head_dim), cos, sin),
                   self._rotate(k.reshape(t, self.kv_heads, self.head_dim), cos, sin),
                   v.reshape(t, self.kv_heads, self.head_dim))

    def finish(self, layer: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        w = self._layers[layer]
        h = h + attn_out.reshape(h.shape[0], -1) @ w["o"]
        gate, up = (_rms(h) @ w["up"]).chunk(2, dim=-1)
        return h + (F.silu(gate) * up) @ w["down"]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return (_rms(h) @ self.embed_w.T).float()

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half (neox) RoPE in float32, back in the model's dtype."""
        a, b = x.float().chunk(2, dim=-1)
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1).to(x.dtype)


def _rms(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
