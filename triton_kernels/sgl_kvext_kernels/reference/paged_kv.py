"""Pure-torch gather / scatter of token rows of a KV pool (the oracle and the CPU path)."""

from __future__ import annotations

import torch


def gather_kv_ref(
    pool: torch.Tensor, locs: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``pool[locs]`` as a new (or the given) ``[n, n_heads, head_dim]`` tensor."""
    if out is None:
        return pool.index_select(0, locs.long())
    torch.index_select(pool, 0, locs.long(), out=out)
    return out


def scatter_kv_ref(pool: torch.Tensor, locs: torch.Tensor, rows: torch.Tensor) -> None:
    """``pool[locs] = rows`` in place, ``rows`` cast to ``pool.dtype`` (round to nearest)."""
    pool.index_copy_(0, locs.long(), rows.to(pool.dtype))
