"""PagedKV.scatter_tokens writes exactly the tokens asked for, into contiguous or scattered
slots, from any token of the first page on, from pages in order or picked by an index."""

from __future__ import annotations

import pytest
import torch

from sgl_kvext.pages.kv_pages import PagedKV

T, LAYERS, HEADS, DIM, SLOTS = 4, 3, 2, 5, 64


def _pool() -> PagedKV:
    k = [torch.zeros(SLOTS, HEADS, DIM) for _ in range(LAYERS)]
    v = [torch.zeros(SLOTS, HEADS, DIM) for _ in range(LAYERS)]
    return PagedKV(k, v, T)


@pytest.mark.parametrize("indexed", [False, True])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize(("skip", "n"), [(0, 12), (0, 10), (1, 3), (3, 9), (2, 1), (1, 11)])
def test_scatter_writes_each_token_to_its_slot(indexed: bool, contiguous: bool, skip: int,
                                               n: int) -> None:
    pool = _pool()
    rows = torch.randn(7, 2, LAYERS, T, HEADS, DIM, generator=torch.Generator().manual_seed(n))
    index = torch.tensor([5, 0, 3])                 # the rows of the three pages, in order
    pages = rows[index]
    slots = torch.arange(20, 20 + n) if contiguous else torch.randperm(SLOTS)[:n]
    if indexed:
        pool.scatter_tokens(slots, rows, skip=skip, index=index)
    else:
        pool.scatter_tokens(slots, pages, skip=skip)
    flat = pages.permute(1, 2, 0, 3, 4, 5).reshape(2, LAYERS, 3 * T, HEADS, DIM)
    for side, buffers in enumerate((pool.k, pool.v)):
        for layer, buf in enumerate(buffers):
            assert torch.equal(buf[slots], flat[side, layer, skip:skip + n])
            untouched = torch.ones(SLOTS, dtype=torch.bool)
            untouched[slots] = False
            assert not buf[untouched].any()


@pytest.mark.parametrize("contiguous", [True, False])
def test_gathered_pages_hold_each_slots_tokens(contiguous: bool) -> None:
    pool = _pool()
    g = torch.Generator().manual_seed(1)
    for buf in (*pool.k, *pool.v):
        buf.copy_(torch.randn(buf.shape, generator=g))
    slots = (torch.arange(8, 8 + 3 * T) if contiguous else torch.randperm(SLOTS)[:3 * T])
    pages = pool.gather_pages(slots.view(3, T))
    for side, buffers in enumerate((pool.k, pool.v)):
        for layer, buf in enumerate(buffers):
            assert torch.equal(pages[:, side, layer].reshape(3 * T, HEADS, DIM), buf[slots])


@pytest.mark.parametrize("rows_at", [
    [2, 3, 4],            # one ascending run: slice copies
    [6, 0, 1],            # two runs
    [5, 3, 1],            # no two adjacent
    list(range(12)),      # twelve pages in one run
    [11, 9, 7, 5, 3, 1, 0, 2, 4, 6, 8, 10],   # more runs than slices are used for
])
def test_pages_gathered_into_tier_rows_land_in_their_rows_only(rows_at: list[int]) -> None:
    pool = _pool()
    g = torch.Generator().manual_seed(2)
    for buf in (*pool.k, *pool.v):
        buf.copy_(torch.randn(buf.shape, generator=g))
    n = len(rows_at)
    slots = torch.randperm(SLOTS, generator=g)[:n * T].view(n, T)
    out = torch.zeros(14, 2, LAYERS, T, HEADS, DIM)
    index = torch.tensor(rows_at)
    pool.gather_into(slots, out, index)
    want = pool.gather_pages(slots)
    for j, row in enumerate(rows_at):
        assert torch.equal(out[row], want[j])
    untouched = torch.ones(14, dtype=torch.bool)
    untouched[index] = False
    assert not out[untouched].any()
