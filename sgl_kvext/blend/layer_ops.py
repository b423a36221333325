"""What the blended prefill needs from a model: its layers one step at a time.

:class:`LayerOps` is the interface; :class:`sgl_kvext.sglang_plugin.model_ops.LlamaLayerOps`
implements it over an SGLang Llama-family model. The blend never imports the model's code.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch


class QKV(NamedTuple):
    """One layer's projections for ``T`` tokens; K already rotated at their positions."""

    q: torch.Tensor        # [T, q_heads, head_dim]
    k: torch.Tensor        # [T, kv_heads, head_dim]
    v: torch.Tensor        # [T, kv_heads, head_dim]


class LayerOps(Protocol):
    """A causal LM's layers, driven layer by layer on any subset of tokens.

    Invariants: :meth:`qkv` returns K rotated at the given positions, as the attention backend
    writes it to the KV pool; :meth:`finish` applies the output projection, residuals and MLP;
    :meth:`logits` returns float32."""

    q_heads: int
    kv_heads: int
    head_dim: int
    scale: float

    @property
    def num_layers(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device:
        """Where the weights live: the blend makes every tensor there (never on torch's
        default device)."""
        ...

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` [T] int64 -> hidden states [T, hidden]."""
        ...

    def qkv(self, layer: int, h: torch.Tensor, positions: torch.Tensor) -> QKV:
        """Input norm, QKV projection and RoPE for hidden states ``h`` [T, hidden]."""
        ...

    def finish(self, layer: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """The rest of ``layer``: ``h`` [T, hidden] its input, ``attn_out`` [T, q_heads, D]."""
        ...

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: ``h`` [N, hidden] -> logits [N, vocab] float32."""
        ...
