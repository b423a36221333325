"""The chain's writer queue under a lower tier that hangs, raises or races: a full queue
drops at once and says so, a flush keeps its deadline, a raising tier loses one batch, a page
still queued is found and read from the queue."""

from __future__ import annotations

import threading
import time

from tier_contract import PAGE, key_of, page_of

from sgl_kvext.tiers.base import PutResult, Tier, TierCapabilities
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.host import HostTier
from sgl_kvext.tiers.metrics import MeteredTier


class _BlockedTier(Tier):
    """A fake lower tier whose writes hang until released: a full, stuck queue."""

    name = "fake-blocked"

    def __init__(self) -> None:
        self.release = threading.Event()

    @property
    def capabilities(self) -> TierCapabilities:
        return TierCapabilities(False, False)

    @property
    def capacity_bytes(self) -> int:
        return 1 << 40

    @property
    def used_bytes(self) -> int:
        return 0

    def get(self, keys):  # type: ignore[no-untyped-def]
        return {}

    def put(self, pages):  # type: ignore[no-untyped-def]
        self.release.wait(30)
        return PutResult(tuple(p.key for p in pages))

    def exists(self, keys):  # type: ignore[no-untyped-def]
        return [False] * len(keys)

    def delete(self, keys):  # type: ignore[no-untyped-def]
        return 0


def test_a_full_write_queue_drops_at_once_never_blocks() -> None:
    stuck = _BlockedTier()
    chain = TierChain([HostTier(8 << 20), stuck], "write_through", queue_bytes=2 * PAGE)
    started = time.monotonic()
    for i in range(6):
        chain.put([page_of(i)])
    assert time.monotonic() - started < 1.0              # a stuck tier never stalls a put
    assert chain.counters["dropped_pages"] == 4          # two pages' worth were queued
    held = chain.lookup([key_of(0)])
    assert held.run == 1                         # the host copy is still there
    stuck.release.set()
    chain.close()


def test_flush_with_a_stuck_tier_returns_false_by_its_deadline_and_starts_no_thread() -> None:
    stuck = _BlockedTier()
    chain = TierChain([HostTier(1 << 20), stuck], "write_through")
    chain.put([page_of(1)])
    threads = threading.active_count()
    started = time.monotonic()
    assert chain.flush(timeout_s=0.3) is False
    assert time.monotonic() - started < 2 and threading.active_count() == threads
    stuck.release.set()
    assert chain.flush(timeout_s=30) is True
    chain.close()


class _FaultRaisingOnceTier(_BlockedTier):
    """Fake for a fault: its first put raises an unexpected error, later ones store."""

    def __init__(self) -> None:
        super().__init__()
        self.release.set()
        self.calls, self.stored = 0, set()

    def put(self, pages):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("fault injected")
        self.stored.update(p.key for p in pages)
        return PutResult(tuple(p.key for p in pages))


def test_a_raising_tier_drops_its_batch_and_the_writer_lives_on() -> None:
    flaky = _FaultRaisingOnceTier()
    chain = TierChain([HostTier(1 << 20), flaky], "write_through")
    chain.put([page_of(0)])
    chain.put([page_of(1)])
    chain.flush(timeout_s=10)
    assert chain.counters["dropped_pages"] == 1
    assert flaky.stored == {key_of(1)}
    chain.close()


class _WriteDuringExistsTier(_BlockedTier):
    """Fake for a rare race: its queued write finishes while ``exists`` is answering."""

    def __init__(self) -> None:
        super().__init__()
        self.stored: set[bytes] = set()
        self.written = threading.Event()

    def put(self, pages):  # type: ignore[no-untyped-def]
        self.release.wait(30)
        self.stored.update(p.key for p in pages)
        self.written.set()
        return PutResult(tuple(p.key for p in pages))

    def exists(self, keys):  # type: ignore[no-untyped-def]
        answer = [k in self.stored for k in keys]     # looked before the write lands
        self.release.set()
        self.written.wait(30)
        time.sleep(0.2)                               # the writer leaves its queue meanwhile
        return answer


def test_a_write_landing_during_a_lookup_is_still_found() -> None:
    racing = _WriteDuringExistsTier()
    chain = TierChain([HostTier(PAGE, "lru", block_bytes=PAGE), racing], "write_back")
    chain.put([page_of(0)])
    chain.put([page_of(1)])                   # page 0 is demoted: queued for the fake
    assert chain.lookup([key_of(0), key_of(1)]).run == 2
    chain.close()


def test_a_dropped_batch_is_reported_and_a_failing_listener_is_contained() -> None:
    stuck = _BlockedTier()
    chain = TierChain([HostTier(1 << 20), stuck], "write_through", queue_bytes=PAGE)
    heard: list[bytes] = []

    def broken(keys: object) -> None:
        raise RuntimeError("listener bug")

    chain.on_loss(broken)
    chain.on_loss(heard.extend)
    for i in range(4):
        chain.put([page_of(i)])
    assert len(heard) == chain.counters["dropped_pages"] >= 1
    stuck.release.set()
    chain.close()


def test_a_page_read_from_a_write_queue_counts_as_that_tiers_hit() -> None:
    stuck = _BlockedTier()
    host, lower = MeteredTier(HostTier(1 * PAGE, "lru", block_bytes=PAGE)), MeteredTier(stuck)
    chain = TierChain([host, lower], "write_back")
    chain.put([page_of(0)])
    chain.put([page_of(1)])                     # demotes page 0 into the stuck tier's queue
    got = chain.get([key_of(0)], promote=False)
    assert [p.key for p in got.pages] == [key_of(0)] and got.tiers == (1,)
    assert lower.snapshot()["hits"] == 1 and lower.snapshot()["bytes_out"] == PAGE
    stuck.release.set()
    chain.close()
