"""The tier chain: demotion, write-through, promotion, longest-run lookup, loss and event
listeners, and a hypothesis state machine against a plain dict model (the writer queue under
faulty lower tiers: ``test_tier_chain_writer.py``)."""

from __future__ import annotations

import threading
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from tier_contract import PAGE, assert_same, key_of, page_of

from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.disk import DiskTier
from sgl_kvext.tiers.host import HostTier
from sgl_kvext.tiers.objects import KVPage

NS = bytes(range(32))


def small_chain(tmp_path: Path, policy: str = "write_back", host_pages: int = 4) -> TierChain:
    host = HostTier(host_pages * PAGE, "lru", block_bytes=PAGE)
    disk = DiskTier(tmp_path / "disk", 1000 * PAGE, NS)
    return TierChain([host, disk], write_policy=policy)


def test_evicted_pages_are_demoted_not_lost(tmp_path: Path) -> None:
    chain = small_chain(tmp_path)
    pages = [page_of(i) for i in range(12)]
    for page in pages:
        chain.put([page])
    chain.flush()
    found = chain.lookup([p.key for p in pages])
    assert found.run == 12
    assert found.tiers.count(0) == 4 and found.tiers.count(1) == 8
    got = chain.get([p.key for p in pages])
    for g, want in zip(got.pages, pages, strict=True):
        assert_same(g, want)
    assert chain.counters["demoted_pages"] >= 8 and chain.counters["promoted_pages"] == 8
    chain.close()


def test_write_through_copies_down_at_once(tmp_path: Path) -> None:
    chain = small_chain(tmp_path, "write_through")
    chain.put([page_of(1), page_of(2)])
    chain.flush()
    assert chain.tiers[1].exists([key_of(1), key_of(2)]) == [True, True]
    chain.close()


def test_write_through_evictions_copy_nothing_and_lose_nothing(tmp_path: Path) -> None:
    """Under write-through a page went down when it was stored: evicting it from the host
    tier reads no bytes and demotes nothing again, and every page stays in the chain."""
    chain = small_chain(tmp_path, "write_through")
    lost: list[bytes] = []
    chain.on_loss(lost.extend)
    pages = [page_of(i) for i in range(12)]
    for page in pages:
        chain.put([page])
    chain.flush()
    assert [t.keep_evicted for t in chain.tiers] == [False, False]
    assert chain.counters["demoted_pages"] == 0 and not lost
    found = chain.lookup([p.key for p in pages])
    assert found.run == 12 and found.tiers.count(0) == 4 and found.tiers.count(1) == 8
    for got, want in zip(chain.get([p.key for p in pages]).pages, pages, strict=True):
        assert_same(got, want)
    assert [t.keep_evicted for t in small_chain(tmp_path / "b").tiers] == [True, False]
    chain.close()


def test_the_last_tier_drops_its_evictions_unread_and_reports_them_lost() -> None:
    host = HostTier(4 * PAGE, "lru", block_bytes=PAGE)
    chain = TierChain([host])
    lost: list[bytes] = []
    chain.on_loss(lost.extend)
    chain.put([page_of(i) for i in range(6)])
    assert lost == [key_of(0), key_of(1)]
    assert host.put([page_of(6)]).dropped == (key_of(2),)       # a key, no bytes read
    host.keep_evicted = True
    result = host.put([page_of(7)])
    assert result.dropped == () and [p.key for p in result.evicted] == [key_of(3)]
    assert_same(result.evicted[0], page_of(3))
    chain.close()


def test_lookup_stops_at_the_first_gap(tmp_path: Path) -> None:
    chain = small_chain(tmp_path)
    chain.put([page_of(0), page_of(1), page_of(3)])
    found = chain.lookup([key_of(i) for i in range(4)])
    assert found.run == 2 and found.tiers == (0, 0)
    assert chain.get([key_of(i) for i in range(4)]).pages[1].key == key_of(1)
    assert chain.lookup([]).run == 0
    chain.close()


def test_get_first_reads_the_first_held_alternative_and_reports_no_loss(tmp_path: Path
                                                                       ) -> None:
    chain = small_chain(tmp_path, "write_through")
    chain.put([page_of(2), page_of(3)])
    chain.flush()
    chain.tiers[0].delete([key_of(2)])               # 2 on disk only, 3 in both tiers
    lost: list[bytes] = []
    chain.on_loss(lost.extend)
    got = chain.get_first([key_of(1), key_of(2), key_of(3)])   # best first
    assert [p.key for p in got.pages] == [key_of(3)] and got.tiers == (0,)  # fastest tier
    got = chain.get_first([key_of(1), key_of(2)])
    assert_same(got.pages[0], page_of(2))
    assert got.tiers == (1,)
    assert chain.get_first([key_of(0), key_of(1)]).pages == ()
    assert lost == [] and chain.counters["promoted_pages"] == 0
    chain.close()


def test_page_too_big_for_host_goes_below(tmp_path: Path) -> None:
    chain = small_chain(tmp_path, host_pages=2)
    big = page_of(7, 5 * PAGE)
    chain.put([big])
    chain.flush()
    assert chain.lookup([big.key]).tiers == (1,)
    assert_same(chain.get([big.key]).pages[0], big)
    chain.close()


def test_corrupt_lower_page_cuts_the_run(tmp_path: Path) -> None:
    chain = small_chain(tmp_path, host_pages=1)
    for i in range(3):
        chain.put([page_of(i)])
    chain.flush()
    victim = next((tmp_path / "disk" / "objects").rglob(key_of(1).hex() + ".kvx"))
    victim.write_bytes(victim.read_bytes()[:-3])
    got = chain.get([key_of(i) for i in range(3)])
    assert [p.key for p in got.pages] == [key_of(0)]
    chain.close()


@settings(max_examples=25, stateful_step_count=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
class ChainModel(RuleBasedStateMachine):
    """Whatever was put and not deleted is readable, with its bytes; nothing else is."""

    @initialize(policy=st.sampled_from(["write_back", "write_through"]))
    def setup(self, policy: str) -> None:
        import tempfile

        self.dir = tempfile.TemporaryDirectory()
        self.chain = small_chain(Path(self.dir.name), policy, host_pages=3)
        self.model: dict[bytes, KVPage] = {}

    @rule(ids=st.lists(st.integers(0, 15), min_size=1, max_size=4))
    def put(self, ids: list[int]) -> None:
        pages = [page_of(i, PAGE // 2) for i in ids]
        self.chain.put(pages)
        self.model.update({p.key: p for p in pages})

    @rule(ids=st.lists(st.integers(0, 15), min_size=1, max_size=3))
    def put_in_place(self, ids: list[int]) -> None:
        import torch

        pages = [page_of(i, PAGE // 2) for i in ids]
        keys, by_key = [p.key for p in pages], {p.key: p for p in pages}

        def fill(rows: torch.Tensor, index: torch.Tensor, which: torch.Tensor) -> None:
            for row, w in zip(index.tolist(), which.tolist(), strict=True):
                data = bytearray(by_key[keys[w]].data)
                rows[row, :PAGE // 2] = torch.frombuffer(data, dtype=torch.uint8)

        assert self.chain.put_in_place(keys, pages[0].dtype, pages[0].shape, fill)
        self.model.update(by_key)

    @rule(ids=st.lists(st.integers(0, 15), min_size=1, max_size=6))
    def get(self, ids: list[int]) -> None:
        keys = [key_of(i) for i in ids]
        got = self.chain.get(keys)
        expect_run = next((n for n, k in enumerate(keys) if k not in self.model), len(keys))
        assert len(got.pages) == expect_run
        for page in got.pages:
            assert_same(page, self.model[page.key])

    @rule(ids=st.lists(st.integers(0, 15), min_size=1, max_size=3))
    def delete(self, ids: list[int]) -> None:
        keys = [key_of(i) for i in ids]
        self.chain.delete(keys)
        for k in keys:
            self.model.pop(k, None)

    @invariant()
    def host_within_cap(self) -> None:
        host = self.chain.tiers[0]
        assert host.used_bytes <= host.capacity_bytes

    def teardown(self) -> None:
        self.chain.close()
        self.dir.cleanup()


TestChainModel = ChainModel.TestCase


def test_loss_listeners_hear_every_page_that_leaves(tmp_path: Path) -> None:
    heard: list[bytes] = []
    host_only = TierChain([HostTier(2 * PAGE, "lru", block_bytes=PAGE)])
    host_only.on_loss(heard.extend)
    host_only.put([page_of(i) for i in range(3)])          # the last tier evicts page 0
    assert heard == [key_of(0)]
    assert host_only.lookup([key_of(1), key_of(9), key_of(2)]).run == 1
    assert heard == [key_of(0), key_of(9)]                  # the first key held nowhere
    host_only.close()

    chain = small_chain(tmp_path, host_pages=2)
    chain.on_loss(heard.extend)
    heard.clear()
    chain.put([page_of(i) for i in range(4)])               # demoted to disk, not lost
    chain.flush(timeout_s=10)
    assert heard == [] and chain.lookup([key_of(i) for i in range(4)]).run == 4
    chain.close()


def test_event_listeners_hear_what_each_tier_stores_and_removes(tmp_path: Path) -> None:
    from sgl_kvext.tiers.chain import TierEvent

    chain = small_chain(tmp_path, host_pages=2)
    heard: list[TierEvent] = []
    chain.on_event(heard.append)
    chain.on_event(lambda event: 1 / 0)                       # a failing listener is contained
    chain.put([page_of(i) for i in range(3)])                 # host keeps 1, 2; 0 demoted
    chain.flush(timeout_s=10)
    stored = {(e.tier, k) for e in heard if e.stored for k in e.keys}
    removed = {(e.tier, k) for e in heard if not e.stored for k in e.keys}
    assert stored == {(0, key_of(0)), (0, key_of(1)), (0, key_of(2)), (1, key_of(0))}
    assert removed == {(0, key_of(0))}
    heard.clear()
    chain.get([key_of(0)])                                    # promoted: stored in host again
    chain.flush(timeout_s=10)                                 # (what it evicts goes to disk)
    assert {(e.tier, e.stored) for e in heard for _ in e.keys} >= {(0, True), (0, False)}
    heard.clear()
    chain.delete([key_of(0)])
    assert [(e.stored, e.keys) for e in heard if e.tier == 1] == [(False, (key_of(0),))]
    chain.close()


def test_pages_put_in_place_go_down_from_copies_of_their_own(tmp_path: Path) -> None:
    import torch

    chain = small_chain(tmp_path, "write_through", host_pages=2)
    pages = [page_of(i) for i in range(3)]
    by_key = {p.key: p for p in pages}
    kind = (pages[0].dtype, pages[0].shape)

    def put(keys: list[bytes]) -> bool:
        def fill(rows: torch.Tensor, index: torch.Tensor, which: torch.Tensor) -> None:
            for row, w in zip(index.tolist(), which.tolist(), strict=True):
                data = bytearray(by_key[keys[w]].data)
                rows[row, :PAGE] = torch.frombuffer(data, dtype=torch.uint8)

        return chain.put_in_place(keys, *kind, fill)

    assert put([p.key for p in pages[:2]])
    assert put([pages[2].key])                                  # evicts page 0
    chain.flush()
    for page in pages:                   # on disk byte for byte, whatever reused its block
        assert_same(chain.tiers[1].get([page.key])[page.key], page)
    assert chain.lookup([p.key for p in pages]).tiers == (1, 0, 0)
    chain.close()


class _GatedDiskTierFake(DiskTier):
    """A real disk tier whose writes wait for a gate: a writer slower than the evictions
    above it, on demand."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gate = threading.Event()

    def put(self, pages):  # type: ignore[no-untyped-def]
        self.gate.wait(30)
        return super().put(pages)


def test_pages_written_through_later_survive_their_eviction_from_the_host(
        tmp_path: Path) -> None:
    """Write-through of pages put in place is read out of the host tier by the writer; a page
    the host evicts first is read by the eviction, stays readable, and still goes down."""
    import torch

    lower = _GatedDiskTierFake(tmp_path / "disk", 1000 * PAGE, NS)
    host = HostTier(2 * PAGE, "lru", block_bytes=PAGE)
    chain = TierChain([host, lower], "write_through")
    pages = [page_of(i) for i in range(6)]
    by_key = {p.key: p for p in pages}
    kind = (pages[0].dtype, pages[0].shape)

    def fill_from(keys: list[bytes]):  # type: ignore[no-untyped-def]
        def fill(rows: torch.Tensor, index: torch.Tensor, which: torch.Tensor) -> None:
            for row, w in zip(index.tolist(), which.tolist(), strict=True):
                data = bytearray(by_key[keys[w]].data)
                rows[row, :PAGE] = torch.frombuffer(data, dtype=torch.uint8)
        return fill

    for pair in (pages[0:2], pages[2:4], pages[4:6]):   # each pair evicts the one before
        keys = [p.key for p in pair]
        assert chain.put_in_place(keys, *kind, fill_from(keys))
    assert host.exists([p.key for p in pages]) == [False] * 4 + [True] * 2
    got = chain.get([p.key for p in pages], promote=False)     # from the queue meanwhile
    assert got.tiers == (1, 1, 1, 1, 0, 0)
    for page, want in zip(got.pages, pages, strict=True):
        assert_same(page, want)
    lower.gate.set()
    assert chain.flush(timeout_s=30)
    for page in pages:                                          # every page went down
        assert_same(lower.get([page.key])[page.key], page)
    assert chain.counters["dropped_pages"] == 0
    assert not chain._deferred._readers and not chain._deferred._kept   # nothing left held
    chain.close()


def test_a_run_larger_than_the_host_tier_is_written_through_whole(tmp_path: Path) -> None:
    """Put in place, 5 pages through a 2-page host tier: it keeps the last 2, and every page
    reaches the disk byte for byte (the first ones read out as they were evicted)."""
    import torch

    chain = small_chain(tmp_path, "write_through", host_pages=2)
    pages = [page_of(50 + i) for i in range(5)]
    keys = [p.key for p in pages]

    def fill(rows: torch.Tensor, index: torch.Tensor, which: torch.Tensor) -> None:
        for row, w in zip(index.tolist(), which.tolist(), strict=True):
            rows[row, :PAGE] = torch.frombuffer(bytearray(pages[w].data), dtype=torch.uint8)

    assert chain.put_in_place(keys, pages[0].dtype, pages[0].shape, fill)
    assert chain.flush(timeout_s=30)
    assert chain.tiers[0].exists(keys) == [False] * 3 + [True] * 2
    for page in pages:
        assert_same(chain.tiers[1].get([page.key])[page.key], page)
    assert chain.counters["dropped_pages"] == 0
    assert not chain._deferred._readers and not chain._deferred._kept
    chain.close()
