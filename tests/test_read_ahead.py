"""ReadAhead's contract: bounded in bytes, all of a request's pages or none, released on drop,
and a mapping handed out stays valid after its request's pages are dropped."""

from __future__ import annotations

from sgl_kvext.pages.read_ahead import ReadAhead
from sgl_kvext.tiers.objects import KVPage


def _pages(prefix: bytes, n: int, size: int = 100) -> list[KVPage]:
    return [KVPage(prefix + bytes([i]), bytes(size), "uint8", (size,)) for i in range(n)]


def test_keeps_a_requests_pages_until_dropped() -> None:
    ahead = ReadAhead(max_bytes=1000)
    assert ahead.keep("a", _pages(b"a", 3), [0] * 3) and ahead.bytes == 300
    held = ahead.peek("a")
    assert set(held) == {b"a\x00", b"a\x01", b"a\x02"}
    ahead.drop("a")
    assert ahead.bytes == 0 and ahead.peek("a") == {}
    assert len(held) == 3                     # handed out: still whole
    ahead.drop("a")                           # dropping twice is harmless
    assert ahead.bytes == 0


def test_all_or_none_within_the_bound() -> None:
    ahead = ReadAhead(max_bytes=500)
    assert ahead.keep("a", _pages(b"a", 3), [0] * 3)
    assert not ahead.keep("b", _pages(b"b", 3), [0] * 3)             # 600 > 500: none kept
    assert ahead.peek("b") == {} and ahead.bytes == 300
    assert ahead.counters == {"kept_pages": 3, "refused_pages": 3}
    assert ahead.keep("a", _pages(b"c", 5), [0] * 5)                  # replaces a's own 300
    assert ahead.bytes == 500 and set(ahead.peek("a")) == {b"c" + bytes([i]) for i in range(5)}
