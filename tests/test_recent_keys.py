"""RecentKeys: a bounded LRU set; a lookup refreshes a key, the oldest go first."""

import threading

import pytest

from sgl_kvext.pages.recent_keys import RecentKeys


def test_forgets_the_least_recently_used_beyond_capacity():
    keys = RecentKeys(3)
    keys.add([b"a", b"b", b"c"])
    assert keys.seen(b"a")            # a is now the most recent; b the oldest
    keys.add([b"d"])
    assert len(keys) == 3
    assert not keys.seen(b"b")
    assert all(keys.seen(k) for k in (b"a", b"c", b"d"))


def test_re_adding_refreshes_and_discard_forgets():
    keys = RecentKeys(2)
    keys.add([b"a", b"b"])
    keys.add([b"a"])
    keys.add([b"c"])
    assert keys.seen(b"a") and not keys.seen(b"b")
    keys.discard([b"a", b"missing"])
    assert not keys.seen(b"a") and len(keys) == 1


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity 0"):
        RecentKeys(0)


def test_concurrent_adds_stay_within_capacity():
    keys = RecentKeys(100)

    def worker(n):
        for i in range(2000):
            keys.add([f"{n}-{i}".encode()])
            keys.seen(f"{n}-{i // 2}".encode())

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(keys) == 100
    assert any(keys.seen(f"{n}-1999".encode()) for n in range(4))   # last thread's final add
