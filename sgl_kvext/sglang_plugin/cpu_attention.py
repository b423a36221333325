"""``--attention-backend kvext_cpu``: SGLang's CPU attention without recomputing a cached prefix.

SGLang's ``torch_native`` backend pads each request's query to its full KV length during extend
and runs causal attention over the whole square, so a request whose prefix is cached still pays
attention for every prefix position: on CPU a fully cached 4k-token prefix took 4.5 s against
7.4 s cold. This backend computes only the new query rows: every extend and decode goes through the
position-masked core the blended prefill also uses (``subset_attention``; query ``i`` of an
extend of ``n`` tokens over ``L`` keys sits at position ``L - n + i`` and sees keys
``0 .. L - n + i``; grouped-query heads). On CPU that core runs such a suffix as two fused
flash-attention calls in the model's dtype (the queries over the cached keys, then causally over
their own), or as one masked call over both put end to end when there are at most 2,048 keys
(``suffix_attention``), so a cold prefill costs what ``torch_native``'s one causal call costs
and a cached prefix costs only its share. Keys and values are read from SGLang's paged pool as
views where their slots are one run (the cached prefix after a prefill in one go; the new
tokens), gathered otherwise: a gather of a 4k-token KV per layer costs ~7 ms of a ~55 ms step
on 2 cores. The pieces are always the same two (the keys before the queries' own, then those)
and the choice of calls depends on their lengths alone, so where the KV sits changes no bit of
the result. Each request's layout is worked out once per forward.

Registered in every SGLang process by the plugin, whether or not ``--enable-hierarchical-kv``
is on, so the bench can compare no cache, SGLang's radix cache and sgl-kvext on one attention.
Encoder, cross-attention and sliding-window layers use ``torch_native``'s own path.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from sgl_kvext.sglang_plugin.surface import TorchNativeAttnBackend, attention_registry
from sgl_kvext_kernels.reference.subset_attention import suffix_attention

#: The ``--attention-backend`` value that selects this backend.
NAME = "kvext_cpu"


class _Layout(NamedTuple):
    """Where one request's keys are in the pool: ``prefix`` the keys before the queries' own
    (``(first slot, length)`` when their slots are one run: a view; else the slots to gather;
    None when there are none) and ``own`` the queries' own slots, in order (None for a single
    query: its key is in ``prefix``, it sees every key)."""

    prefix: tuple[int, int] | torch.Tensor | None
    own: torch.Tensor | None


def _layout(slots: torch.Tensor, n_new: int) -> _Layout:
    """Pieces of a request's ``slots`` (its ``kv_len`` keys; the last ``n_new`` its queries').
    Always these two pieces, whatever the slots: where the KV sits changes no bit of the result
    (a tier hit computes the very numbers a device hit does)."""
    prefix = slots.shape[0] - n_new if n_new > 1 else slots.shape[0]
    head = slots[:prefix]
    piece = None if prefix == 0 else (int(head[0]), prefix) if _is_run(head) else head
    return _Layout(piece, slots[prefix:] if prefix < slots.shape[0] else None)


def _is_run(slots: torch.Tensor) -> bool:
    """The slots ascend by one (a non-empty 1-D tensor)."""
    n = slots.shape[0]
    return int(slots[-1]) - int(slots[0]) == n - 1 and (n == 1 or bool((slots.diff() == 1)
                                                                      .all()))


class _Layouts:
    """Each request's layout, worked out once per forward instead of once per layer: kept with
    a copy of the slots it came from and reused only for equal slots and query count (a cheap
    comparison: the layout is a function of them alone)."""

    def __init__(self) -> None:
        self._by_row: dict[int, tuple[torch.Tensor, int, _Layout]] = {}

    def get(self, row: int, slots: torch.Tensor, n_new: int) -> _Layout:
        kept = self._by_row.get(row)
        if kept is not None and kept[1] == n_new and torch.equal(kept[0], slots):
            return kept[2]
        layout = _layout(slots, n_new)
        if len(self._by_row) >= _LAYOUTS_KEPT:
            self._by_row.clear()
        self._by_row[row] = (slots.clone(), n_new, layout)
        return layout


#: At most this many requests' layouts are kept (a batch's worth).
_LAYOUTS_KEPT = 256


def _read(cache: torch.Tensor, piece: tuple[int, int] | torch.Tensor,
          dtype: torch.dtype) -> torch.Tensor:
    """A layout piece's rows of ``cache`` in ``dtype``: a view of ``(first slot, length)``,
    else a gather of the slots."""
    if isinstance(piece, tuple):
        first, length = piece
        return cache[first:first + length].to(dtype)
    return cache.index_select(0, piece).to(dtype)


def _rows(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``cache[slots]``: a view when the slots ascend by one."""
    if _is_run(slots):
        first = int(slots[0])
        return cache[first:first + slots.shape[0]]
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
            row = int(req_pool_indices[i])
            layout = self._layouts.get(row, req_to_token[row, :kv_len], n_new)
            self._attend(query[start:start + n_new], output[start:start + n_new], k_cache,
                         v_cache, layout, scaling)
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
            row = int(req_pool_indices[i])
            layout = self._layouts.get(row, req_to_token[row, :int(seq_lens[i])], 1)
            self._attend(query[i:i + 1], output[i:i + 1], k_cache, v_cache, layout, scaling)
        return output

    @property
    def _layouts(self) -> _Layouts:
        layouts = self.__dict__.get("_kvext_layouts")
        if layouts is None:                       # SGLang builds the backend; no __init__ here
            layouts = self.__dict__["_kvext_layouts"] = _Layouts()
        return layouts

    @staticmethod
    def _attend(q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, layout: _Layout, scale: float | None) -> None:
        """Causal attention of the last ``n`` positions of a sequence over all of it.

        ``q`` / ``out`` ``[n, heads, dim]``; the sequence's keys and values are rows of the
        caches ``[slots, kv_heads, dim]`` where ``layout`` says (``kv_len`` of them, ``n <=
        kv_len``); the queries are positions ``kv_len - n .. kv_len - 1``.
        """
        if q.shape[0] == 0:
            return
        dtype = q.dtype
        pieces = [] if layout.prefix is None else [
            (_read(k_cache, layout.prefix, dtype), _read(v_cache, layout.prefix, dtype))]
        own = None if layout.own is None else (_rows(k_cache, layout.own).to(dtype),
                                               _rows(v_cache, layout.own).to(dtype))
        scale = scale if scale is not None else q.shape[-1] ** -0.5
        suffix_attention(q, pieces, own, scale, out)


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
