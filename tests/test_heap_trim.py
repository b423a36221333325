"""HeapTrimmer: trims at most once per interval, and a trim really hands a fragmented C
heap's free pages back to the OS (glibc, which these machines run)."""

from __future__ import annotations

import ctypes

import pytest

from sgl_kvext.sglang_plugin.heap_trim import HeapTrimmer


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_trims_at_most_once_per_interval() -> None:
    now = [100.0]
    trimmer = HeapTrimmer(interval_s=30.0, clock=lambda: now[0])
    assert trimmer.available
    assert not trimmer.maybe_trim()                  # the interval starts at construction
    now[0] += 30.0
    assert trimmer.maybe_trim()
    now[0] += 29.0
    assert not trimmer.maybe_trim()
    now[0] += 1.0
    assert trimmer.maybe_trim() and trimmer.trims == 2


def test_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        HeapTrimmer(interval_s=-1)


def test_trim_returns_the_free_holes_of_a_fragmented_heap() -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 64 << 10, 3000                     # under glibc's mmap threshold: heap
    blocks = [libc.malloc(size) for _ in range(count)]
    assert all(blocks)
    try:
        for b in blocks:
            ctypes.memset(b, 1, size)                # resident
        for i, b in enumerate(blocks):
            if i % 16:                               # every 16th stays: the heap cannot shrink
                libc.free(b)
        before = _rss_bytes()
        assert HeapTrimmer(interval_s=0).maybe_trim()
        released = before - _rss_bytes()
        assert released > (count * size) // 2       # most of the ~176 MiB freed
    finally:
        for b in blocks[::16]:
            libc.free(b)
