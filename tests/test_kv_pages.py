"""PagedKV.scatter_tokens writes exactly the tokens asked for, into contiguous slots, a few
ascending runs of slots (broken mid-page) or scattered slots, from any token of the first page
on, from pages in order or picked by an index."""

from __future__ import annotations

import pytest
import torch

from sgl_kvext.pages import kv_pages
from sgl_kvext.pages.kv_pages import PagedKV

T, LAYERS, HEADS, DIM, SLOTS = 4, 3, 2, 5, 64


def _pool() -> PagedKV:
    k = [torch.zeros(SLOTS, HEADS, DIM) for _ in range(LAYERS)]
    v = [torch.zeros(SLOTS, HEADS, DIM) for _ in range(LAYERS)]
    return PagedKV(k, v, T)


def _slots(layout: str, n: int) -> torch.Tensor:
    if layout == "run":
        return torch.arange(20, 20 + n)
    if layout == "runs":             # three ascending runs, out of order (a free list in pieces)
        a, b = n // 3, 2 * n // 3
        return torch.cat([torch.arange(40, 40 + a), torch.arange(5, 5 + b - a),
                          torch.arange(25, 25 + n - b)])
    return torch.randperm(SLOTS, generator=torch.Generator().manual_seed(n))[:n]


@pytest.mark.parametrize("slice_min", [1, 4, 10**9])     # whole pages sliced / all indexed
@pytest.mark.parametrize("indexed", [False, True])
@pytest.mark.parametrize("layout", ["run", "runs", "scattered"])
@pytest.mark.parametrize(("skip", "n"), [(0, 12), (0, 10), (1, 3), (3, 9), (2, 1), (1, 11)])
def test_scatter_writes_each_token_to_its_slot(indexed: bool, layout: str, skip: int, n: int,
                                               slice_min: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_pages, "_SLICE_MIN_TOKENS", slice_min)
    pool = _pool()
    rows = torch.randn(7, 2, LAYERS, T, HEADS, DIM, generator=torch.Generator().manual_seed(n))
    index = torch.tensor([5, 0, 3])                 # the rows of the three pages, in order
    pages = rows[index]
    slots = _slots(layout, n)
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


@pytest.mark.parametrize("gap", [0, 10, 5])   # blocks wider than a page: by whole tokens, or not
@pytest.mark.parametrize("slice_min", [1, 10**9])
def test_scatter_reads_pages_from_rows_wider_than_a_page(gap: int, slice_min: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_pages, "_SLICE_MIN_TOKENS", slice_min)
    pool = _pool()
    page = 2 * LAYERS * T * HEADS * DIM
    blocks = torch.randn(7, page + gap, generator=torch.Generator().manual_seed(gap))
    rows = blocks[:, :page].view(7, 2, LAYERS, T, HEADS, DIM)
    index = torch.tensor([6, 1, 4])
    slots = _slots("runs", 11)
    pool.scatter_tokens(slots, rows, skip=1, index=index)
    flat = rows[index].permute(1, 2, 0, 3, 4, 5).reshape(2, LAYERS, 3 * T, HEADS, DIM)
    for side, buffers in enumerate((pool.k, pool.v)):
        for layer, buf in enumerate(buffers):
            assert torch.equal(buf[slots], flat[side, layer, 1:12])
