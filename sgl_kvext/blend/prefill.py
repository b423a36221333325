"""Full and blended (CacheBlend) prefill over a Llama-family model's own layers.

A blended prefill reuses each chunk's KV computed on its own: cached K is re-rotated from the
chunk's own positions ``0..n-1`` to its place in the prompt; at the check layer every token is
computed and the ``ratio`` of reused tokens whose fresh K deviates most is selected; later
layers recompute only those tokens plus every token outside a reused chunk (and the last
token, whose logits the caller needs). At ``ratio == 1`` every token is recomputed in every
layer, which is a full prefill.

A span may follow a *prefix* whose KV is already computed (in the server: the radix match,
at positions ``0..P-1``): its tokens are attended to, never recomputed, and the span's default
positions are ``P..P+T-1``.

Shapes: ``T`` tokens in the span, ``P`` prefix tokens, ``L`` layers, ``H`` KV heads, ``D`` head
dim.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sgl_kvext.blend.layer_ops import LayerOps
from sgl_kvext.blend.selection import (
    DEFAULT_SETTINGS,
    BlendSettings,
    choose,
    tail_attention,
    top_indices,
)
from sgl_kvext_kernels import RopeConfig, kv_deviation, rerotate_k, subset_attention


@dataclass(frozen=True, eq=False)
class ChunkKV:
    """A chunk's KV computed alone, K rotated at positions ``position..position+n-1``.

    A chunk computed on its own starts at ``position`` 0; :meth:`part` keeps a slice of it
    (for a fragment whose head is already in the cached prefix, or whose tail is cut off) and
    remembers where the slice sat, so re-rotation starts from the right angle.

    Attributes
    ----------
    token_ids
        [n] int64.
    k, v
        [L, n, H, D].
    position
        Position of the first token when the KV was computed.
    """

    token_ids: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    position: int = 0

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def part(self, start: int, end: int) -> ChunkKV:
        """Tokens ``[start, end)`` of the chunk (views, no copy)."""
        if not 0 <= start < end <= len(self):
            raise ValueError(f"part [{start}, {end}) of a {len(self)}-token chunk")
        return ChunkKV(self.token_ids[start:end], self.k[:, start:end], self.v[:, start:end],
                       self.position + start)


class ReusedChunk(NamedTuple):
    """A stored chunk found at ``start`` (an index into the span's tokens)."""

    start: int
    kv: ChunkKV


class PrefixKV(NamedTuple):
    """KV of the ``P`` tokens before the span, at positions ``0..P-1``: k / v [L, P, H, D]."""

    k: torch.Tensor
    v: torch.Tensor

    def __len__(self) -> int:
        return int(self.k.shape[1])


class StepSeconds(NamedTuple):
    """Wall time of a blended prefill's steps: placing the stored KV (re-rotation), the layers
    up to the check layer (every token), the later layers (the selected tokens)."""

    place: float = 0.0
    check_layers: float = 0.0
    later_layers: float = 0.0


class PrefillResult(NamedTuple):
    """KV for the whole span and the last token's logits.

    ``k`` / ``v`` are [L, T, H, D]; ``last_logits`` is [vocab] float32; ``recomputed_tokens``
    counts the tokens recomputed after the check layer (``T`` for a full prefill)."""

    k: torch.Tensor
    v: torch.Tensor
    last_logits: torch.Tensor
    recomputed_tokens: int
    reused_tokens: int
    seconds: StepSeconds = StepSeconds()


def _attend(ops: LayerOps, q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor, kv_pos: torch.Tensor, prefix: PrefixKV | None = None,
            layer: int = 0) -> torch.Tensor:
    """q [A, Hq, D] over (prefix +) k / v [T, H, D], position-causal mask -> [A, Hq, D].
    KV positions ascend (the prefix's ``0..P-1``, then the span's, checked increasing)."""
    if prefix is not None and len(prefix):
        p = len(prefix)
        k = torch.cat((prefix.k[layer], k))
        v = torch.cat((prefix.v[layer], v))
        kv_pos = torch.cat((torch.arange(p, dtype=kv_pos.dtype, device=kv_pos.device), kv_pos))
        return subset_attention(q, q_pos, k, v, kv_pos, scale=ops.scale, kv_sorted=True)
    if q.shape[0] == k.shape[0] and torch.equal(q_pos, kv_pos):
        # Every token queries: plain causal attention (positions are increasing).
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                           v.transpose(0, 1), is_causal=True, scale=ops.scale,
                                           enable_gqa=True)
        return o.transpose(0, 1)
    return subset_attention(q, q_pos, k, v, kv_pos, scale=ops.scale, kv_sorted=True)


def _span_positions(ops: LayerOps, input_ids: torch.Tensor, positions: torch.Tensor | None,
                    prefix: PrefixKV | None) -> torch.Tensor:
    """The span's positions (default right after the prefix), checked."""
    if input_ids.dim() != 1 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must be a non-empty 1-D tensor, got {tuple(input_ids.shape)}")
    p = len(prefix) if prefix is not None else 0
    if prefix is not None:
        want = (ops.num_layers, p, ops.kv_heads, ops.head_dim)
        if tuple(prefix.k.shape) != want or prefix.v.shape != prefix.k.shape:
            raise ValueError(f"prefix KV must be {want}, got {tuple(prefix.k.shape)} / "
                             f"{tuple(prefix.v.shape)}")
    pos = torch.arange(p, p + input_ids.shape[0], device=input_ids.device) \
        if positions is None else positions.to(input_ids.device)
    if pos.shape != input_ids.shape:
        raise ValueError(f"positions {tuple(pos.shape)} must match input_ids "
                         f"{tuple(input_ids.shape)}")
    if pos.shape[0] > 1 and bool((pos[1:] <= pos[:-1]).any()):
        raise ValueError("positions must be strictly increasing")
    if p and int(pos[0]) < p:
        raise ValueError(f"the span's positions start at {int(pos[0])}, inside the {p}-token "
                         "prefix")
    return pos


@torch.no_grad()
def full_prefill(ops: LayerOps, input_ids: torch.Tensor,
                 positions: torch.Tensor | None = None,
                 prefix: PrefixKV | None = None) -> PrefillResult:
    """Ordinary causal prefill of ``input_ids`` [T] at ``positions`` [T] (default 0..T-1, or
    right after ``prefix``), attending to ``prefix``'s KV as well."""
    pos = _span_positions(ops, input_ids, positions, prefix)
    h = ops.embed(input_ids)
    ks, vs = [], []
    for layer in range(ops.num_layers):
        q, k, v = ops.qkv(layer, h, pos)
        h = ops.finish(layer, h, _attend(ops, q, pos, k, v, pos, prefix, layer))
        ks.append(k)
        vs.append(v)
    n = int(input_ids.shape[0])
    return PrefillResult(torch.stack(ks), torch.stack(vs), ops.logits(h[-1:])[0], n, 0)


def compute_chunk_kv(ops: LayerOps, token_ids: torch.Tensor, lead: torch.Tensor | None = None,
                     rope: RopeConfig | None = None) -> ChunkKV:
    """A chunk's KV computed on its own: K rotated at positions ``0..n-1``.

    ``lead`` [m]: tokens the chunk's own text starts with but its fragment leaves out (a
    marked document's first token: its key covers the core only, :mod:`sgl_kvext.fragments`).
    They are computed first, at ``0..m-1``, so the chunk's tokens see them as they do in the
    document alone (the first token is the attention sink), then dropped; K is re-rotated
    from ``m..m+n-1`` to ``0..n-1`` (``rope`` required)."""
    if lead is None or lead.numel() == 0:
        result = full_prefill(ops, token_ids)
        return ChunkKV(token_ids.clone(), result.k, result.v)
    if rope is None:
        raise ValueError("a chunk computed after lead tokens needs the model's RoPE")
    m, n = int(lead.numel()), int(token_ids.numel())
    result = full_prefill(ops, torch.cat((lead.to(token_ids.device), token_ids)))
    dev = result.k.device
    k = _rerotate_layers(ops, result.k[:, m:], torch.arange(m, m + n, device=dev),
                         torch.arange(n, device=dev), rope)
    return ChunkKV(token_ids.clone(), k.contiguous(), result.v[:, m:].contiguous())


def _rerotate_layers(ops: LayerOps, k: torch.Tensor, old: torch.Tensor, new: torch.Tensor,
                     rope: RopeConfig) -> torch.Tensor:
    """K [L, n, H, D] re-rotated from positions ``old`` to ``new`` [n], every layer at once
    (tokens first, (layer, head) pairs as heads)."""
    n = int(k.shape[1])
    rows = k.transpose(0, 1).reshape(n, -1, ops.head_dim)
    return rerotate_k(rows, old, new, rope).view(
        n, ops.num_layers, ops.kv_heads, ops.head_dim).transpose(0, 1)


def _place_chunks(ops: LayerOps, input_ids: torch.Tensor, positions: torch.Tensor,
                  chunks: Sequence[ReusedChunk], rope: RopeConfig
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cached K (re-rotated) / V [L, T, H, D], the reuse mask [T] and each token's chunk
    (its index in start order, -1 outside every chunk) for the span."""
    t, dev = int(input_ids.shape[0]), input_ids.device
    shape = (ops.num_layers, t, ops.kv_heads, ops.head_dim)
    cached_k = torch.zeros(shape, dtype=ops.dtype, device=dev)
    cached_v = torch.zeros(shape, dtype=ops.dtype, device=dev)
    reused = torch.zeros(t, dtype=torch.bool, device=dev)
    chunk_of = torch.full((t,), -1, dtype=torch.int64, device=dev)
    for i, chunk in enumerate(sorted(chunks, key=lambda c: c.start)):
        n, s = len(chunk.kv), chunk.start
        if s < 0 or s + n > t:
            raise ValueError(f"chunk at {s} of {n} tokens does not fit a span of {t} tokens")
        if bool(reused[s:s + n].any()):
            raise ValueError(f"chunk at {s} overlaps another reused chunk")
        if not torch.equal(input_ids[s:s + n], chunk.kv.token_ids.to(dev)):
            raise ValueError(f"chunk at {s}: its token ids differ from the span's")
        if tuple(chunk.kv.k.shape) != (ops.num_layers, n, ops.kv_heads, ops.head_dim):
            raise ValueError(f"chunk at {s}: KV shape {tuple(chunk.kv.k.shape)} does not fit "
                             f"the model ({ops.num_layers}, n, {ops.kv_heads}, {ops.head_dim})")
        old = torch.arange(chunk.kv.position, chunk.kv.position + n, device=dev)
        new = positions[s:s + n]
        cached_k[:, s:s + n] = _rerotate_layers(ops, chunk.kv.k.to(dev), old, new, rope)
        cached_v[:, s:s + n] = chunk.kv.v.to(dev)
        reused[s:s + n] = True
        chunk_of[s:s + n] = i
    return cached_k, cached_v, reused, chunk_of


@torch.no_grad()
def blended_prefill(ops: LayerOps, input_ids: torch.Tensor, chunks: Sequence[ReusedChunk],
                    rope: RopeConfig, *, positions: torch.Tensor | None = None,
                    prefix: PrefixKV | None = None,
                    settings: BlendSettings = DEFAULT_SETTINGS) -> PrefillResult:
    """CacheBlend prefill of ``input_ids`` [T] reusing ``chunks``' KV.

    Parameters
    ----------
    ops
        The model's layers.
    input_ids
        [T] int64, the span (the chunks' tokens sit inside it at their ``start``).
    chunks
        Non-overlapping reused chunks.
    rope
        The model's RoPE, to re-rotate cached K to the span's positions.
    positions
        [T] increasing positions of the span (default ``0..T-1``, or ``P..P+T-1`` after a
        prefix).
    prefix
        KV of ``P`` tokens before the span (positions ``0..P-1``): attended to, not recomputed.
    settings
        Recompute ratio, check layer and how tokens are chosen (:mod:`.selection`). Layers
        before the check layer are computed in full.
    """
    pos = _span_positions(ops, input_ids, positions, prefix)
    check = settings.check_layer
    if check >= ops.num_layers:
        raise ValueError(f"check_layer {check} must be in [0, {ops.num_layers})")
    started = time.perf_counter()
    cached_k, cached_v, reused, chunk_of = _place_chunks(ops, input_ids, pos, chunks, rope)
    placed = checked = time.perf_counter()
    t = int(input_ids.shape[0])
    reuse_idx = reused.nonzero().flatten()
    sinks = _sinks(chunk_of, settings.sink_tokens)[reuse_idx]
    tail = (~reused).nonzero().flatten()
    tail = tail[tail > int(reuse_idx.max())] if reuse_idx.numel() else tail[:0]
    active = torch.arange(t, device=input_ids.device)   # tokens whose hidden state is carried
    h = ops.embed(input_ids)
    ks, vs = [], []
    for layer in range(ops.num_layers):
        q, k, v = ops.qkv(layer, h, pos[active])
        if layer <= check:
            k_all, v_all = k, v
        else:
            if layer - check <= settings.narrow_layers and settings.gradual > 1:
                keep = _narrow(settings, cached_k[layer], k, active, reused, reuse_idx.numel(),
                               layer - check)
                k_all, v_all = cached_k[layer], cached_v[layer]
                k_all[active], v_all[active] = k, v   # every computed row is fresh here
                active, q, h = active[keep], q[keep], h[keep]
            else:
                k_all, v_all = cached_k[layer], cached_v[layer]
                k_all[active], v_all[active] = k, v
        if layer == check:
            # Every token was computed here: choose by deviation (and what the tail attends).
            deviation = kv_deviation(cached_k[layer, reuse_idx], k[reuse_idx])
            attention = tail_attention(q, k, tail, ops.scale)[reuse_idx] \
                if settings.needs_attention and tail.numel() else None
            count = settings.narrowed(reuse_idx.numel(), 0)
            chosen = choose(settings, deviation, chunk_of[reuse_idx], sinks, attention, count)
            keep = ~reused
            keep[reuse_idx[chosen]] = True
            keep[t - 1] = True                  # the caller needs the last token's logits
            active = keep.nonzero().flatten()
            q, h = q[active], h[active]
        h = ops.finish(layer, h, _attend(ops, q, pos[active], k_all, v_all, pos, prefix, layer))
        ks.append(k_all)
        vs.append(v_all)
        if layer == check:
            checked = time.perf_counter()
    logits = ops.logits(h[-1:])[0]
    return PrefillResult(torch.stack(ks), torch.stack(vs), logits, int(active.shape[0]),
                         int(reused.sum()), StepSeconds(placed - started, checked - placed,
                                                        time.perf_counter() - checked))


def _sinks(chunk_of: torch.Tensor, n: int) -> torch.Tensor:
    """[T] bool: the first ``n`` tokens of each reused chunk (``chunk_of`` -1 outside)."""
    sink = torch.zeros(chunk_of.numel(), dtype=torch.bool, device=chunk_of.device)
    if n:
        before = torch.cat((torch.full((1,), -2, dtype=torch.int64, device=chunk_of.device),
                            chunk_of[:-1]))
        for s in ((chunk_of >= 0) & (chunk_of != before)).nonzero().flatten().tolist():
            sink[s:s + n] = chunk_of[s:s + n] == chunk_of[s]
    return sink


def _narrow(settings: BlendSettings, cached_k: torch.Tensor, fresh_k: torch.Tensor,
            active: torch.Tensor, reused: torch.Tensor, n_reused: int,
            after_check: int) -> torch.Tensor:
    """Rows of ``active`` to keep computing after this layer (gradual filtering): every row
    outside a reused chunk, the last one, and the reused rows that deviate most here."""
    rows = reused[active].nonzero().flatten()
    target = settings.narrowed(n_reused, after_check)
    keep = ~reused[active]
    keep[-1] = True
    if rows.numel() <= target:
        keep[rows] = True
        return keep.nonzero().flatten()
    deviation = kv_deviation(cached_k[active[rows]], fresh_k[rows])
    keep[rows[top_indices(deviation, target)]] = True
    return keep.nonzero().flatten()
