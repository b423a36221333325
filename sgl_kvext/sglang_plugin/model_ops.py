"""The per-layer steps of a Llama-family model, run through the loaded model's own modules.

:class:`LlamaLayerOps` wraps an SGLang ``LlamaForCausalLM`` (also Mistral / Qwen2 / SmolLM2,
which share its module layout) without copying a weight and without importing sglang: it only
calls the modules the model already holds. The blended prefill drives it layer by layer on
any subset of tokens, through :class:`sgl_kvext.blend.LayerOps`. The attribute names it reads
are SGLang's model layout; ``sgl_kvext.sglang_plugin.surface`` lists them.

Invariants: the unfused RMSNorm form is used (the fused ``(x, residual)`` form runs in place on
AMX / CUDA); K leaves :meth:`qkv` rotated at the given positions, exactly as the attention
backend writes it to the KV pool; tensor parallelism is 1 (``o_proj`` / ``down_proj`` are built
without their all-reduce).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from sgl_kvext.blend.layer_ops import QKV


class LlamaLayerOps:
    """Layer-by-layer access to a loaded Llama-family causal LM (a
    :class:`~sgl_kvext.blend.LayerOps`).

    Parameters
    ----------
    model
        The loaded model (``model.model.layers[i].self_attn.qkv_proj`` etc., as SGLang builds
        it).
    pause
        Called before each layer's two steps (:meth:`qkv`, :meth:`finish`) on the calling
        thread: in the server, :func:`sgl_kvext.scheduler_turn.pause`.
    """

    def __init__(self, model: Any, pause: Callable[[], None] = lambda: None) -> None:
        lm = model.model
        if not hasattr(lm, "layers") or not hasattr(lm.layers[0].self_attn, "qkv_proj"):
            raise ValueError(f"{type(model).__name__} is not a Llama-family model with fused "
                             "qkv_proj layers; supported: Llama, Mistral, Qwen2, SmolLM2")
        self._model = model
        self._lm = lm
        self._pause = pause
        self.layers = list(lm.layers[lm.start_layer:lm.end_layer])
        attn = self.layers[0].self_attn
        self.q_heads: int = attn.num_heads
        self.kv_heads: int = attn.num_kv_heads
        self.head_dim: int = attn.head_dim
        self.scale: float = float(attn.scaling)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return self._lm.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self._lm.embed_tokens.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` [T] int64 -> hidden states [T, hidden]."""
        return self._lm.embed_tokens(input_ids)

    def qkv(self, layer: int, h: torch.Tensor, positions: torch.Tensor) -> QKV:
        """Input norm, fused QKV projection and RoPE for hidden states ``h`` [T, hidden]."""
        self._pause()
        attn = self.layers[layer].self_attn
        x = self.layers[layer].input_layernorm(h)
        out, _bias = attn.qkv_proj(x)
        q, k, v = out.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        t = h.shape[0]
        return QKV(q.reshape(t, self.q_heads, self.head_dim),
                   k.reshape(t, self.kv_heads, self.head_dim),
                   v.reshape(t, self.kv_heads, self.head_dim))

    def finish(self, layer: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, post-attention norm, MLP, residual.

        ``h`` [T, hidden] is the layer's input, ``attn_out`` [T, q_heads, head_dim]."""
        self._pause()
        mod = self.layers[layer]
        o, _bias = mod.self_attn.o_proj(attn_out.reshape(h.shape[0], -1))
        h = h + o
        return h + mod.mlp(mod.post_attention_layernorm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: ``h`` [N, hidden] -> logits [N, vocab] in float32."""
        x = self._lm.norm(h)
        return F.linear(x, self._model.lm_head.weight).float()
