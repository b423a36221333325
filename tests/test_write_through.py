"""Write-through off the scheduler thread: the worker's contract (:class:`WriteBehind`) and
the tree's use of it (:class:`WriteThrough`) on SGLang's real CPU pool, allocator and tree.

The tree tests reuse test_tree's harness (real pool, real tiers); a copy is made slow only by
``slow_store_fake``, which holds the worker before the real copy until the test lets it go
(a real copy is too fast to race deterministically).
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from test_tree import Harness, kv_of, seq

from sgl_kvext.pages.keys import DEFAULT_TENANT
from sgl_kvext.pages.plans import SpillJob
from sgl_kvext.pages.write_behind import WriteBehind
from sgl_kvext.sglang_plugin import write_through
from sgl_kvext.sglang_plugin.write_through import WriteThrough

pytestmark = pytest.mark.unit


def _job(n: int) -> SpillJob:
    return SpillJob(tuple(bytes([i]) * 16 for i in range(n)), torch.zeros((n, 8)), None)


class _Gate:
    """Holds every call until :meth:`open` (or 10 s); records the order of calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.entered = threading.Event()
        self._open = threading.Event()

    def open(self) -> None:
        self._open.set()

    def store(self, job: SpillJob, token: str) -> int:
        self.calls.append(token)
        self.entered.set()
        assert self._open.wait(10)
        if token == "bad":
            raise OSError("the tier refused it")
        return len(job.keys)


def test_jobs_run_in_order_and_tokens_return_only_after_their_store() -> None:
    gate = _Gate()
    writer: WriteBehind[str] = WriteBehind(gate.store, capacity=2)
    try:
        assert writer.submit(_job(2), "a") and writer.submit(_job(3), "b")
        assert gate.entered.wait(10)
        assert writer.submit(_job(1), "c")
        assert not writer.submit(_job(1), "d")        # 2 queued: full, the caller copies
        assert writer.done() == [] and writer.pending == 3
        gate.open()
        assert writer.wait(10)
        assert writer.done() == ["a", "b", "c"] and gate.calls == ["a", "b", "c"]
        assert writer.counters == {"jobs": 3, "pages": 6, "failed": 0, "refused": 1}
    finally:
        gate.open()
        writer.close()


def test_a_failed_store_is_counted_and_still_releases_its_token() -> None:
    gate = _Gate()
    gate.open()
    writer: WriteBehind[str] = WriteBehind(gate.store)
    try:
        assert writer.submit(_job(2), "bad") and writer.submit(_job(1), "ok")
        assert writer.wait(10)
        assert writer.done() == ["bad", "ok"]
        assert writer.counters["failed"] == 1 and writer.counters["pages"] == 1
    finally:
        writer.close()


def test_cancel_drops_queued_jobs_and_close_returns_every_token() -> None:
    gate = _Gate()
    writer: WriteBehind[str] = WriteBehind(gate.store)
    assert writer.submit(_job(1), "running") and writer.submit(_job(1), "queued")
    assert gate.entered.wait(10)
    assert writer.cancel_queued() == ["queued"]
    assert not writer.wait_running(0.05)            # the running one holds its slots
    assert writer.submit(_job(1), "later")
    gate.open()
    assert sorted(writer.close(10)) == ["later", "running"]
    assert gate.calls == ["running", "later"]
    assert not writer.submit(_job(1), "after close")


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path, pool_tokens=64)
    yield h
    h.close()


def _node(h: Harness, tokens: list[int]):  # type: ignore[no-untyped-def]
    m = h.tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens))))
    assert m.device_prefix_len == len(tokens)
    return m.last_device_node, h.tree.path_device_indices(m.last_device_node)


def slow_store_fake(h: Harness) -> _Gate:
    """The tiering's real store, entered only when the returned gate opens."""
    gate, real = _Gate(), h.tiering.store

    def store(job: SpillJob, intact=lambda: True) -> int:  # type: ignore[no-untyped-def]
        gate.calls.append("store")
        gate.entered.set()
        assert gate._open.wait(10)
        return real(job, intact)

    h.tiering.store = store  # type: ignore[method-assign]
    return gate


def test_a_written_through_path_stays_locked_until_copied_then_loads_back_exactly(
        harness: Harness) -> None:
    h, a = harness, seq(1000, 44)                  # 5 full pages and a tail of 4
    h.insert(a)
    gate = slow_store_fake(h)
    wt = WriteThrough(h.tiering, h.tree.inc_lock_ref, h.tree.dec_lock_ref)
    try:
        node, slots = _node(h, a)
        wt.store(DEFAULT_TENANT, a, slots, node)
        assert h.tree.protected_size() == 44 and h.tree.evictable_size() == 0
        h.tree.evict(EvictParams(num_tokens=44))   # nothing to evict: the copy holds it
        assert h.tree.protected_size() == 44
        gate.open()
        assert wt._writer.wait(10)
        wt.release()
        assert h.tree.protected_size() == 0 and h.tree.evictable_size() == 44
        h.check_accounting()
        spilled = h.tiering.counters["spilled_pages"]
        h.tree.evict(EvictParams(num_tokens=1000))
        assert h.tiering.counters["spilled_pages"] == spilled == 6   # nothing copied twice
        assert h.fetch(a) == 44
        torch.testing.assert_close(h.device_kv(a), kv_of(a), rtol=0, atol=0)
    finally:
        gate.open()
        wt.close()


def test_an_eviction_short_of_room_drops_queued_copies_and_waits_for_the_running_one(
        harness: Harness) -> None:
    h, a, b = harness, seq(1000, 32), seq(5000, 32)
    h.insert(a)
    h.insert(b)                                    # the 64-slot pool is full
    gate = slow_store_fake(h)
    wt = WriteThrough(h.tiering, h.tree.inc_lock_ref, h.tree.dec_lock_ref)
    try:
        for tokens in (a, b):
            wt.store(DEFAULT_TENANT, tokens, _node(h, tokens)[1], _node(h, tokens)[0])
        assert gate.entered.wait(10)               # a's copy runs, b's waits
        assert h.tree.evictable_size() == 0
        wt.make_room(32, h.tree.evictable_size)    # b's copy dropped: b is evictable
        assert h.tree.evictable_size() == 32 and h.tree.protected_size() == 32
        threading.Timer(0.2, gate.open).start()
        wt.make_room(64, h.tree.evictable_size)    # a's copy waited for, then unlocked
        assert h.tree.evictable_size() == 64 and h.tree.protected_size() == 0
        h.check_accounting()
        h.tree.evict(EvictParams(num_tokens=64))   # b is spilled by its eviction instead
        for tokens in (a, b):
            assert h.fetch(tokens, rid=str(tokens[0])) == 32
            torch.testing.assert_close(h.device_kv(tokens), kv_of(tokens), rtol=0, atol=0)
    finally:
        gate.open()
        wt.close()


def test_a_copy_still_running_after_a_reset_stores_nothing(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(write_through, "DRAIN_S", 0.1)
    h, a = harness, seq(1000, 32)
    h.insert(a)
    gate = slow_store_fake(h)
    wt = WriteThrough(h.tiering, h.tree.inc_lock_ref, h.tree.dec_lock_ref)
    try:
        node, slots = _node(h, a)
        wt.store(DEFAULT_TENANT, a, slots, node)
        assert gate.entered.wait(10)
        wt.reset()                                 # gave up waiting: the slots may be reused
        h.tree.reset()
        h.alloc.clear()
        gate.open()
        assert wt._writer.wait(10)
        wt.release()                               # the old tree's node is not unlocked
        assert h.tree.protected_size() == 0
        assert h.tiering.counters["spilled_pages"] == 0
        assert h.fetch(a) == 0
    finally:
        gate.open()
        wt.close()


def test_a_failed_copy_leaves_its_pages_to_be_spilled_at_eviction(harness: Harness) -> None:
    h, a = harness, seq(1000, 32)
    h.insert(a)
    real = h.tiering.store

    def failing_store_fake(job: SpillJob, intact=lambda: True) -> int:  # type: ignore[no-untyped-def]
        raise OSError("the host tier refused it (a fault a real tier does not give on cue)")

    h.tiering.store = failing_store_fake  # type: ignore[method-assign]
    wt = WriteThrough(h.tiering, h.tree.inc_lock_ref, h.tree.dec_lock_ref)
    try:
        node, slots = _node(h, a)
        wt.store(DEFAULT_TENANT, a, slots, node)
        assert wt._writer.wait(10)
        wt.release()
        assert h.tree.protected_size() == 0 and wt.counters["failed"] == 1
        h.tiering.store = real  # type: ignore[method-assign]
        h.tree.evict(EvictParams(num_tokens=1000))    # the eviction stores what failed
        assert h.tiering.counters["spilled_pages"] == 4
        assert h.fetch(a) == 32
        torch.testing.assert_close(h.device_kv(a), kv_of(a), rtol=0, atol=0)
    finally:
        wt.close()
