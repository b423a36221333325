"""Placing stored chunks: every layer's K re-rotated to the span's positions, V as stored."""

from __future__ import annotations

from typing import NamedTuple

import torch

from sgl_kvext.blend.prefill import ChunkKV, ReusedChunk, _place_chunks
from sgl_kvext_kernels import RopeConfig, rerotate_k


class Geometry(NamedTuple):
    """The part of the model's layers that placement reads (a real layout, no compute)."""

    num_layers: int = 3
    kv_heads: int = 2
    head_dim: int = 16
    dtype: torch.dtype = torch.float32


def test_each_layer_is_rerotated_as_alone_and_v_is_copied() -> None:
    g, rope = Geometry(), RopeConfig(head_dim=16, rotary_dim=16, theta=10000.0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.arange(100, 140)
    chunks = []
    for start, n, origin in ((3, 10, 0), (20, 12, 5)):       # the second is a chunk's tail
        k = torch.randn(g.num_layers, n, g.kv_heads, g.head_dim, generator=gen)
        v = torch.randn(g.num_layers, n, g.kv_heads, g.head_dim, generator=gen)
        chunks.append(ReusedChunk(start, ChunkKV(ids[start:start + n], k, v, origin)))
    positions = torch.arange(40) + 7
    cached_k, cached_v, reused, chunk_of = _place_chunks(g, ids, positions, chunks, rope)
    for i, c in enumerate(chunks):
        n, s = len(c.kv), c.start
        old = torch.arange(c.kv.position, c.kv.position + n)
        for layer in range(g.num_layers):
            want = rerotate_k(c.kv.k[layer].contiguous(), old, positions[s:s + n], rope)
            torch.testing.assert_close(cached_k[layer, s:s + n], want, atol=1e-6, rtol=1e-6)
        assert torch.equal(cached_v[:, s:s + n], c.kv.v)
        assert bool(reused[s:s + n].all()) and bool((chunk_of[s:s + n] == i).all())
    assert int(reused.sum()) == 22 and not bool(cached_k[:, :3].any())
