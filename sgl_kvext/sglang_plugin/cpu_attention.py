"""``--attention-backend kvext_cpu``: SGLang's CPU attention without recomputing a cached prefix.

SGLang's ``torch_native`` backend pads each request's query to its full KV length during extend
and runs causal attention over the whole square, so a request whose prefix is cached still pays
attention for every prefix position: on CPU a fully cached 4k-token prefix took 4.5 s against
7.4 s cold. This backend computes only the new query rows: every extend and decode goes through the
position-masked core the blended prefill also uses (``subset_attention``; query ``i`` of an
extend of ``n`` tokens over ``L`` keys sits at position ``L - n + i`` and sees keys
``0 .. L - n + i``; grouped-query heads). On CPU that core runs such a suffix as two fused
flash-attention calls in the model's dtype (the queries over the cached keys, then causally over
their own), so a cold prefill costs what ``torch_native``'s one causal call costs and a cached
prefix costs only its share. Keys and values are read from SGLang's paged pool as a view when a
request's slots are one ascending run, gathered otherwise.

Registered in every SGLang process by the plugin, whether or not ``--enable-hierarchical-kv``
is on, so the bench can compare no cache, SGLang's radix cache and sgl-kvext on one attention.
Encoder, cross-attention and sliding-window layers use ``torch_native``'s own path.
"""

from __future__ import annotations

from typing import Any

import torch

from sgl_kvext.sglang_plugin.surface import TorchNativeAttnBackend, attention_registry
from sgl_kvext_kernels import subset_attention

#: The ``--attention-backend`` value that selects this backend.
NAME = "kvext_cpu"


def _rows(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``cache[slots]`` as ``[len, kv_heads, dim]``: a view when the slots ascend by one."""
    n = slots.shape[0]
    if n > 0:
        first = int(slots[0])
        if int(slots[-1]) - first == n - 1 and (n == 1 or bool((slots.diff() == 1).all())):
            return cache[first:first + n]
    return cache.index_select(0, slots)      # 6x faster than cache[slots] on CPU


def _special(encoder_lens: torch.Tensor | None, is_cross_attn: bool,
             sliding_window_size: int | None) -> bool:
    """Layers this backend leaves to ``torch_native``."""
    return encoder_lens is not None or is_cross_attn or (
        sliding_window_size is not None and sliding_window_size > -1)


class KVExtCPUAttnBackend(TorchNativeAttnBackend):
    """``TorchNativeAttnBackend`` whose extend skips cached-prefix query rows and whose decode
    reads contiguous KV without a copy; everything else (KV writes, metadata) is SGLang's."""

    def _run_sdpa_forward_extend(self, query: torch.Tensor, output: torch.Tensor,
                                 k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                                 seq_lens: torch.Tensor, extend_prefix_lens: torch.Tensor,
                                 extend_seq_lens: torch.Tensor,
                                 encoder_lens: torch.Tensor | None = None, scaling: Any = None,
                                 enable_gqa: bool = False, causal: bool = False,
                                 is_cross_attn: bool = False,
                                 sliding_window_size: int | None = None) -> torch.Tensor:
        """Extend attention of a batch; shapes as in SGLang: ``query`` / ``output``
        ``[tokens, heads, dim]`` (requests back to back), caches ``[slots, kv_heads, dim]``."""
        if _special(encoder_lens, is_cross_attn, sliding_window_size) or not causal:
            return super()._run_sdpa_forward_extend(
                query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                extend_prefix_lens, extend_seq_lens, encoder_lens, scaling, enable_gqa, causal,
                is_cross_attn, sliding_window_size)
        start = 0
        for i in range(seq_lens.shape[0]):
            n_new, kv_len = int(extend_seq_lens[i]), int(seq_lens[i])
            slots = req_to_token[req_pool_indices[i], :kv_len]
            self._attend(query[start:start + n_new], output[start:start + n_new],
                         _rows(k_cache, slots), _rows(v_cache, slots), scaling)
            start += n_new
        return output

    def _run_sdpa_forward_decode(self, query: torch.Tensor, output: torch.Tensor,
                                 k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                                 seq_lens: torch.Tensor,
                                 encoder_lens: torch.Tensor | None = None, scaling: Any = None,
                                 enable_gqa: bool = False, causal: bool = False,
                                 is_cross_attn: bool = False,
                                 sliding_window_size: int | None = None) -> torch.Tensor:
        """One new token per request, over that request's whole KV (lengths may differ)."""
        if _special(encoder_lens, is_cross_attn, sliding_window_size):
            return super()._run_sdpa_forward_decode(
                query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                encoder_lens, scaling, enable_gqa, causal, is_cross_attn, sliding_window_size)
        for i in range(seq_lens.shape[0]):
            slots = req_to_token[req_pool_indices[i], :int(seq_lens[i])]
            self._attend(query[i:i + 1], output[i:i + 1], _rows(k_cache, slots),
                         _rows(v_cache, slots), scaling)
        return output

    @staticmethod
    def _attend(q: torch.Tensor, out: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float | None) -> None:
        """Causal attention of the last ``n`` positions of a sequence over all of it.

        ``q`` / ``out`` ``[n, heads, dim]``, ``k`` / ``v`` ``[kv_len, kv_heads, dim]``,
        ``n <= kv_len``; the queries are positions ``kv_len - n .. kv_len - 1``.
        """
        kv_len = k.shape[0]
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        positions = torch.arange(kv_len, device=q.device)
        subset_attention(q, positions[kv_len - q.shape[0]:], k, v, positions, scale=scale,
                         out=out)


def disable_graphs_for(args: Any) -> bool:
    """Turn CUDA/CPU graph capture off when ``kvext_cpu`` is picked (as SGLang does for
    ``torch_native``: the per-request loops are not capturable); True when it changed."""
    picked = any(getattr(args, f, None) == NAME for f in (
        "attention_backend", "prefill_attention_backend", "decode_attention_backend"))
    if picked and not getattr(args, "disable_cuda_graph", True):
        args.disable_cuda_graph = True
        return True
    return False


def register() -> None:
    """Make ``--attention-backend kvext_cpu`` a valid choice that builds this backend."""
    choices, register_attention_backend = attention_registry()
    if NAME not in choices:
        choices.append(NAME)
    register_attention_backend(NAME)(KVExtCPUAttnBackend)
