"""Prefix-aware extend attention for SGLang's ``torch_native`` backend (the CPU engine's).

SGLang's ``TorchNativeAttnBackend`` pads each request's query to its full KV length during
extend and runs causal attention over the whole square, so a request whose prefix is cached
still pays attention for every prefix position as if it were new: on CPU a fully cached
4k-token prefix took 4.5 s against 7.4 s cold. This backend computes only the new query
rows, against all keys, with a mask that lets row ``i`` (absolute position ``prefix + i``)
see keys ``0 .. prefix + i``. Same inputs, same math per row; only the wasted rows go.

It keeps the name ``torch_native`` (SGLang special-cases that name on its CPU paths) and is
installed, in the scheduler process only, when ``--enable-hierarchical-kv`` is on with
``--kvext-cpu-attention prefix`` (the default).
"""

from __future__ import annotations

from typing import Any

import torch
from sglang.srt.layers.attention.attention_registry import register_attention_backend
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from torch.nn.functional import scaled_dot_product_attention


class PrefixAwareTorchNativeBackend(TorchNativeAttnBackend):
    """``TorchNativeAttnBackend`` whose extend skips the cached-prefix query rows."""

    def _run_sdpa_forward_extend(self, query: torch.Tensor, output: torch.Tensor,
                                 k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                                 seq_lens: torch.Tensor, extend_prefix_lens: torch.Tensor,
                                 extend_seq_lens: torch.Tensor,
                                 encoder_lens: torch.Tensor | None = None, scaling: Any = None,
                                 enable_gqa: bool = False, causal: bool = False,
                                 is_cross_attn: bool = False,
                                 sliding_window_size: int | None = None) -> torch.Tensor:
        """Extend attention; shapes as in SGLang: query / output ``[tokens, heads, dim]``,
        caches ``[slots, kv_heads, dim]``. Encoder and sliding-window cases use SGLang's path.
        """
        if encoder_lens is not None or is_cross_attn or (
                sliding_window_size is not None and sliding_window_size > -1):
            return super()._run_sdpa_forward_extend(
                query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                extend_prefix_lens, extend_seq_lens, encoder_lens, scaling, enable_gqa, causal,
                is_cross_attn, sliding_window_size)
        heads_first = query.movedim(0, -2)                       # [heads, tokens, dim]
        start_q = 0
        for i in range(seq_lens.shape[0]):
            q_len, prefix = int(extend_seq_lens[i]), int(extend_prefix_lens[i])
            kv_len = int(seq_lens[i])
            q = heads_first[:, start_q:start_q + q_len, :]
            slots = req_to_token[req_pool_indices[i], :kv_len]
            k = k_cache[slots].movedim(0, -2)                    # [kv_heads, kv_len, dim]
            v = v_cache[slots].movedim(0, -2)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
            mask = None
            if causal and prefix > 0:   # row r is position prefix + r: sees keys 0 .. prefix + r
                rows = torch.arange(prefix, prefix + q_len, device=q.device).unsqueeze(1)
                mask = torch.arange(kv_len, device=q.device).unsqueeze(0) <= rows
            out = scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                               attn_mask=mask, enable_gqa=enable_gqa,
                                               scale=scaling,
                                               is_causal=causal and prefix == 0)
            output[start_q:start_q + q_len] = out.squeeze(0).movedim(-2, 0)
            start_q += q_len
        return output


def install() -> None:
    """Make ``--attention-backend torch_native`` build the prefix-aware backend."""
    register_attention_backend("torch_native")(PrefixAwareTorchNativeBackend)
