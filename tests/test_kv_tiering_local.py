"""A load reads from every local tier: pages the host tier has lost to disk come back from
disk straight into the pool (the host tier never has to hold the batch), when that is
expected to beat recomputing them; remote tiers are only prefetched."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import remote_disk_fake

from sgl_kvext.pages.keys import DEFAULT_TENANT as T0
from sgl_kvext.pages.keys import ModelIdentity
from sgl_kvext.pages.kv_pages import PagedKV
from sgl_kvext.pages.plans import MISS, Hold, LoadOutcome, LoadPlan
from sgl_kvext.pages.tiering import DIRECT_READ_S, KVTiering
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.disk import DiskTier
from sgl_kvext.tiers.host import HostTier

T, LAYERS, HEADS, DIM, SLOTS = 4, 2, 2, 4, 256
IDENTITY = ModelIdentity("cfg", "weights", "float32", T, "mha:layers=2,kv_heads=2,head_dim=4")
BLOCK = 1024                       # a host block holds one 512-byte page
NS = bytes(range(32))
PATH = list(range(1000, 1040))     # 10 pages


def _tiering(lower: DiskTier, host_pages: int = 4, write_policy: str = "write_back"
             ) -> KVTiering:
    gen = torch.Generator().manual_seed(0)
    k = [torch.randn(SLOTS, HEADS, DIM, generator=gen) for _ in range(LAYERS)]
    v = [torch.randn(SLOTS, HEADS, DIM, generator=gen) for _ in range(LAYERS)]
    chain = TierChain([HostTier(host_pages * BLOCK, block_bytes=BLOCK), lower], write_policy)
    tiering = KVTiering(PagedKV(k, v, T), chain, IDENTITY, prefetch_threads=1)
    tiering.cost.prefill_tps = 1.0           # recomputing is slow: reading disk wins
    return tiering


def _kv(t: KVTiering, slots: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.stack([buf[slots] for buf in side]) for side in (t.pool.k,
                                                                             t.pool.v)])


@pytest.fixture
def spilled(tmp_path: Path) -> Iterator[KVTiering]:
    """10 pages spilled through a 4-page host tier: 6 of them were demoted to disk."""
    tiering = _tiering(DiskTier(tmp_path / "disk", 1 << 20, NS, codec="none"))
    assert tiering.spill(T0, PATH, torch.arange(40), 0) == 10
    assert tiering.chain.flush(10.0)
    yield tiering
    tiering.close()


@pytest.mark.parametrize("device_len", [0, 6])
def test_pages_on_disk_load_straight_into_the_pool(spilled: KVTiering, device_len: int) -> None:
    host_before = spilled.chain.tiers[0].used_bytes
    plan = spilled.plan(T0, PATH, device_len)
    assert isinstance(plan, LoadPlan) and (plan.start, plan.end) == (device_len, 40)
    from_disk = plan.tiers.count(1)
    assert from_disk >= 6 - device_len // T and set(plan.tiers) == {0, 1}
    assert plan.sources == plan.tiers
    host = plan.tiers.count(0) * T               # the newest pages, whole
    assert spilled.tokens_by_tier(plan) == {"host": host, "disk": 40 - device_len - host}
    slots = torch.arange(100, 100 + plan.tokens)
    assert spilled.load(plan, slots) is LoadOutcome.LOADED
    assert torch.equal(_kv(spilled, slots), _kv(spilled, torch.arange(device_len, 40)))
    assert spilled.counters["streamed_pages"] == from_disk
    assert spilled.chain.tiers[0].used_bytes == host_before     # nothing promoted on the way
    assert spilled.cost.samples["load"] >= 1                    # disk speed measured


def test_disk_is_not_read_when_recomputing_is_faster(spilled: KVTiering) -> None:
    plan = spilled.plan(T0, PATH, 0)
    assert isinstance(plan, LoadPlan) and plan.tiers[:6] == (1,) * 6   # the oldest went down
    spilled.cost.prefill_tps = 1e12
    assert spilled.plan(T0, PATH, 0, prefetch_id="r") == MISS
    assert spilled.prefetcher.counters["started"] == 1           # brought up instead


def test_one_load_reads_disk_for_a_bounded_time_and_prefetches_the_rest(
        spilled: KVTiering) -> None:
    spilled.cost.tier_bps[1] = spilled.pool.page_nbytes / (DIRECT_READ_S / 2.5)
    plan = spilled.plan(T0, PATH, 0, prefetch_id="r")          # 0.4 of the budget a page
    assert isinstance(plan, LoadPlan) and plan.tiers == (1, 1) and plan.end == 2 * T
    assert spilled.prefetcher.counters["started"] == 1


def test_a_page_that_moved_between_plan_and_load_is_found_in_its_new_tier(
        spilled: KVTiering) -> None:
    plan = spilled.plan(T0, PATH, 0)
    assert isinstance(plan, LoadPlan)
    host, disk = spilled.chain.tiers
    on_disk = plan.keys[plan.tiers.index(1)]
    on_host = plan.keys[plan.tiers.index(0)]
    disk.put([*host.get([on_host]).values()])          # demoted meanwhile
    host.delete([on_host])
    host.put([*disk.get([on_disk]).values()])          # promoted by a prefetch meanwhile
    disk.delete([on_disk])
    slots = torch.arange(100, 140)
    assert spilled.load(plan, slots) is LoadOutcome.LOADED
    assert torch.equal(_kv(spilled, slots), _kv(spilled, torch.arange(40)))
    disk.delete([on_host])                             # now gone from every tier: a miss
    assert spilled.load(plan, slots) is LoadOutcome.MISSING


def test_pages_demoted_between_plan_and_load_are_read_within_the_bound_or_planned_again(
        spilled: KVTiering) -> None:
    # The stall bench's 16 MiB host tier demotes pages between a match and its load: reading
    # them all from disk on the scheduler took up to 91 ms with a 20 ms bound.
    spilled.cost.tier_bps[1] = spilled.pool.page_nbytes / (DIRECT_READ_S / 2.5)
    plan = spilled.plan(T0, PATH, 24)                  # pages 6-9, all in the host tier
    assert isinstance(plan, LoadPlan) and plan.tiers == (0,) * 4, plan
    host, disk = spilled.chain.tiers
    disk.put([*host.get(list(plan.keys[1:])).values()])    # 3 demoted: 1.2x the bound
    host.delete(list(plan.keys[1:]))
    slots = torch.arange(100, 116)
    assert spilled.load(plan, slots, "r") is LoadOutcome.MOVED
    assert spilled.counters["streamed_pages"] == 0        # none read on this thread
    assert spilled.load(plan, slots, "r") is LoadOutcome.LOADED   # once: then unbounded
    assert torch.equal(_kv(spilled, slots), _kv(spilled, torch.arange(24, 40)))
    host.put([*disk.get([plan.keys[1]]).values()])     # 2 moved: within the bound
    streamed = spilled.counters["streamed_pages"]
    assert spilled.load(plan, slots, "q") is LoadOutcome.LOADED
    assert spilled.counters["streamed_pages"] == streamed + 2
    assert spilled.counters["moved_loads"] == 1


def test_a_remote_tier_is_prefetched_never_read_on_the_scheduler(tmp_path: Path) -> None:
    tiering = _tiering(remote_disk_fake(tmp_path / "remote", 1 << 20, NS))
    try:
        tiering.spill(T0, PATH, torch.arange(40), 0)
        assert tiering.chain.flush(10.0)
        plan = tiering.plan(T0, PATH, 0, prefetch_id="r")
        assert not isinstance(plan, LoadPlan) or set(plan.tiers) == {0}
        assert tiering.prefetcher.counters["started"] == 1
    finally:
        tiering.close()


def test_pages_no_tier_holds_are_prefetched_once_and_admission_stops_waiting(
        tmp_path: Path) -> None:
    # The fleet bench's failover turn: history in the remote tier, a new question no tier
    # holds. Asking for the new pages again on every pass kept a prefetch running, so
    # admission held the request until its deadline (30 s with wait_complete).
    tiering = _tiering(remote_disk_fake(tmp_path / "remote", 1 << 20, NS), host_pages=16,
                       write_policy="write_through")
    try:
        tiering.spill(T0, PATH, torch.arange(40), 0)
        assert tiering.chain.flush(10.0)
        tiering.chain.tiers[0].delete(tiering.keys.all(T0, PATH))  # only the remote tier
        prompt = PATH + list(range(7000, 7012))                     # 3 pages never stored
        tiering.prefetch_policy = "wait_complete"
        first = tiering.admit(T0, prompt, 0, request_id="r")
        assert tiering.prefetcher.wait("r", 10.0)
        passes = [tiering.admit(T0, prompt, 0, request_id="r") for _ in range(3)]
        assert tiering.prefetcher.counters["started"] == 1, first
        assert all(isinstance(p, LoadPlan) and p.end == 40 for p in passes), passes
        tiering.forget("r")                         # the request left: its id starts afresh
        tiering.admit(T0, prompt, 0, request_id="r")
        assert tiering.prefetcher.counters["started"] == 2
    finally:
        tiering.close()


def test_pages_past_the_direct_budget_are_read_ahead_and_loaded_from_memory(
        spilled: KVTiering) -> None:
    # 4 host pages, 10 on the path: the prefetch's promotions cannot all stay in the host
    # tier, so without the read-ahead the load would read them from disk on this thread.
    spilled.cost.tier_bps[1] = spilled.pool.page_nbytes / (DIRECT_READ_S / 2.5)
    held = spilled.admit(T0, PATH, 0, request_id="r")          # 2 pages direct, then a hold
    assert isinstance(held, Hold), held
    assert spilled.prefetcher.wait("r", 10.0)
    assert spilled.prefetcher.read_ahead.bytes == 10 * spilled.pool.page_nbytes  # the run
    plan = spilled.admit(T0, PATH, 0, request_id="r")
    assert isinstance(plan, LoadPlan) and (plan.start, plan.end) == (0, 40), plan
    assert len(plan.ahead) == 10 and plan.tiers == (0,) * 10
    # read from memory, reported as where the prefetch read each page: 4 host, 6 disk
    assert plan.sources == (1,) * 6 + (0,) * 4
    assert spilled.tokens_by_tier(plan) == {"host": 16, "disk": 24}
    assert spilled.admit(T0, PATH, 0, request_id="r") == plan     # matched again: the same
    slots = torch.arange(100, 140)
    assert spilled.load(plan, slots, "r") is LoadOutcome.LOADED
    assert spilled.prefetcher.read_ahead.bytes == 0               # released by the load
    assert torch.equal(_kv(spilled, slots), _kv(spilled, torch.arange(40)))
    assert spilled.counters["streamed_pages"] == 0                # no disk read here
    assert spilled.counters["ahead_pages"] == 10
    assert spilled.chain.counters["promoted_pages"] == 0          # the host tier left alone


def test_a_prefetch_finishing_while_admission_plans_holds_for_one_more_pass(
        spilled: KVTiering) -> None:
    # Seen on the real server: the read-ahead was peeked before the prefetch finished and
    # the prefetch was found done right after, so a plan of the 2 direct pages was loaded
    # and the other 8 recomputed. A fake for a race a real part cannot time on demand.
    spilled.cost.tier_bps[1] = spilled.pool.page_nbytes / (DIRECT_READ_S / 2.5)
    release, get = threading.Event(), spilled.chain.get
    spilled.chain.get = lambda *a, **k: (release.wait(10.0), get(*a, **k))[1]  # type: ignore
    assert isinstance(spilled.admit(T0, PATH, 0, request_id="r"), Hold)
    ahead, peek = spilled.prefetcher.read_ahead, spilled.prefetcher.read_ahead.peek

    def peek_then_finish(request_id: object) -> object:
        pages = peek(request_id)       # before the prefetch finishes: nothing yet
        release.set()
        assert spilled.prefetcher.wait("r", 10.0)
        return pages

    ahead.peek = peek_then_finish      # type: ignore[method-assign]
    assert isinstance(spilled.admit(T0, PATH, 0, request_id="r"), Hold)
    ahead.peek = peek                  # type: ignore[method-assign]
    plan = spilled.admit(T0, PATH, 0, request_id="r")
    assert isinstance(plan, LoadPlan) and plan.end == 40 and len(plan.ahead) == 10, plan


def test_read_ahead_is_bounded_and_released_when_the_request_leaves(
        spilled: KVTiering) -> None:
    ahead = spilled.prefetcher.read_ahead
    spilled.cost.tier_bps[1] = spilled.pool.page_nbytes / (DIRECT_READ_S / 2.5)
    assert isinstance(spilled.admit(T0, PATH, 0, request_id="r"), Hold)
    assert spilled.prefetcher.wait("r", 10.0) and ahead.bytes > 0
    spilled.forget("r")
    assert ahead.bytes == 0
    kept = ahead.counters["kept_pages"]
    ahead.max_bytes = 3 * spilled.pool.page_nbytes                 # less than the run
    spilled.cost.tier_bps[1] = spilled.pool.page_nbytes / (DIRECT_READ_S / 2.5)  # re-measured
    host_promoted = spilled.chain.counters["promoted_pages"]
    assert isinstance(spilled.admit(T0, PATH, 0, request_id="q"), Hold)
    assert spilled.prefetcher.wait("q", 10.0)
    assert ahead.bytes == 0 and ahead.counters["kept_pages"] == kept    # all or none
    assert ahead.counters["refused_pages"] == 10
    assert spilled.chain.counters["promoted_pages"] == host_promoted + 6   # promoted instead


def test_a_hold_for_disk_pages_is_budgeted_at_the_disk_speed_not_the_remote_one(
        tmp_path: Path) -> None:
    # host, disk, then a remote tier far too slow to wait for: pages past the direct-read
    # budget are on disk, so waiting for them is worth it (budgeted at the slowest tier, the
    # request was never held and its disk pages were recomputed)
    gen = torch.Generator().manual_seed(0)
    kv = [[torch.randn(SLOTS, HEADS, DIM, generator=gen) for _ in range(LAYERS)]
          for _ in range(2)]
    chain = TierChain([HostTier(4 * BLOCK, block_bytes=BLOCK),
                       DiskTier(tmp_path / "disk", 1 << 20, NS, codec="none"),
                       remote_disk_fake(tmp_path / "remote", 1 << 20, NS)], "write_back")
    tiering = KVTiering(PagedKV(kv[0], kv[1], T), chain, IDENTITY, prefetch_threads=1)
    try:
        assert tiering.spill(T0, PATH, torch.arange(40), 0) == 10 and chain.flush(10.0)
        page_s = DIRECT_READ_S / 2.5                        # 2 disk pages fit the budget
        tiering.cost.tier_bps[1] = tiering.pool.page_nbytes / page_s
        tiering.cost.tier_bps[2] = tiering.pool.page_nbytes / 100.0   # remote: 100 s a page
        tiering.cost.prefill_tps = T / (10 * page_s)        # a page's recompute: 10 reads
        assert isinstance(tiering.admit(T0, PATH, 0, request_id="r"), Hold)
        assert tiering.prefetcher.wait("r", 10.0)
        plan = tiering.admit(T0, PATH, 0, request_id="r")
        assert isinstance(plan, LoadPlan) and plan.end == 40 and len(plan.ahead) == 10
    finally:
        tiering.close()


class StalledDiskFake(DiskTier):
    """A disk whose writes wait until released (a slow device a real test disk is not)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)   # type: ignore[arg-type]
        self.release = threading.Event()

    def put(self, pages):  # type: ignore[no-untyped-def]
        assert self.release.wait(10.0)
        return super().put(pages)


@pytest.mark.parametrize("write_policy", ["write_back", "write_through"])
def test_spilled_pages_survive_the_reuse_of_the_spill_buffer(tmp_path: Path,
                                                             write_policy: str) -> None:
    """Spills go through one reused staging buffer: the pages queued for the disk (write
    through, or demoted past a 1-page host tier) are copies, never the buffer's next bytes."""
    disk = StalledDiskFake(tmp_path / "disk", 1 << 20, NS, codec="none")
    tiering = _tiering(disk, host_pages=1, write_policy=write_policy)
    try:
        other = list(range(5000, 5040))
        assert tiering.spill(T0, PATH, torch.arange(40), 0) == 10     # queued, not written
        assert tiering.spill(T0, other, torch.arange(40, 80), 0) == 10   # same buffer, new KV
        disk.release.set()
        assert tiering.chain.flush(10.0)
        for path, slots in ((PATH, torch.arange(40)), (other, torch.arange(40, 80))):
            keys = tiering.keys_for(T0, path)
            pages = disk.get(keys)
            assert len(pages) >= 9                  # all but what the host tier still holds
            for i, key in enumerate(keys):
                if key in pages:
                    got = torch.frombuffer(bytearray(pages[key].data), dtype=torch.float32)
                    want = _kv(tiering, slots[i * T:(i + 1) * T]).reshape(-1)   # page layout
                    assert torch.equal(got, want), f"page {i} of a spilled path"
    finally:
        disk.release.set()
        tiering.close()


def test_a_tail_another_process_wrote_to_a_shared_disk_folder_comes_back(tmp_path: Path
                                                                         ) -> None:
    """A history's last partial page written by another instance sharing the disk folder
    (or by this server before a restart) loads with the full pages before it, exactly."""
    path = PATH + [7, 8]                            # 10 full pages and a 2-token tail
    writer = _tiering(DiskTier(tmp_path / "disk", 1 << 20, NS, codec="none"),
                      write_policy="write_through")
    reader = _tiering(DiskTier(tmp_path / "disk", 1 << 20, NS, codec="none"))
    try:
        assert writer.spill(T0, path, torch.arange(42), 0) == 11
        assert writer.chain.flush(10.0)
        for buf in (*reader.pool.k, *reader.pool.v):
            buf.zero_()                             # nothing of the writer's KV here
        plan = reader.plan(T0, path + [9], 0, prefetch_id="r")
        assert isinstance(plan, LoadPlan) and plan.end == 42 and set(plan.tiers) == {1}
        slots = torch.arange(100, 142)
        assert reader.load(plan, slots, "r") is LoadOutcome.LOADED
        assert torch.equal(_kv(reader, slots), _kv(writer, torch.arange(42)))
        # The load taught the cost model this disk's speed; a slow machine's would cut the
        # next run at DIRECT_READ_S (a CI run under load: 9 of 10 pages). Pinned instead.
        reader.cost.tier_bps[1] = 1e9
        assert reader.plan(T0, path[:41] + [1], 0).end == 40    # other tail tokens
        reader.cost.prefill_tps = 1e12              # recomputing 2 tokens beats a disk read
        assert reader.plan(T0, path, 40) == MISS
    finally:
        writer.close()
        reader.close()


@pytest.mark.parametrize("prefill_tps", [1.0, 1e12])
def test_a_tail_only_a_remote_tier_holds_is_read_ahead_when_that_beats_recomputing(
        tmp_path: Path, prefill_tps: float) -> None:
    """Another instance's history on S3 (a remote tier): the prefetch of its full pages also
    finds the partial page after them, when a remote page beats recomputing a page of
    tokens; on a fast device (recomputing wins) it is not asked for."""
    path = PATH + [7, 8]                            # 10 full pages and a 2-token tail
    writer = _tiering(remote_disk_fake(tmp_path / "remote", 1 << 20, NS),
                      write_policy="write_through")
    reader = _tiering(remote_disk_fake(tmp_path / "remote", 1 << 20, NS))
    reader.cost.prefill_tps = prefill_tps
    reader.prefetch_policy = "wait_complete"
    try:
        assert writer.spill(T0, path, torch.arange(42), 0) == 11
        assert writer.chain.flush(10.0)
        for buf in (*reader.pool.k, *reader.pool.v):
            buf.zero_()                             # nothing of the writer's KV here
        prompt = path + [9, 10, 11]                 # the history's next turn
        assert isinstance(reader.admit(T0, prompt, 0, request_id="r"), Hold)
        assert reader.prefetcher.wait("r", 10.0)
        plan = reader.admit(T0, prompt, 0, request_id="r")
        assert isinstance(plan, LoadPlan), plan
        assert plan.end == (42 if prefill_tps == 1.0 else 40)
        assert set(plan.sources) == {1}             # every page read ahead from the remote
        slots = torch.arange(100, 100 + plan.end)
        assert reader.load(plan, slots, "r") is LoadOutcome.LOADED
        assert torch.equal(_kv(reader, slots), _kv(writer, torch.arange(plan.end)))
    finally:
        writer.close()
        reader.close()
