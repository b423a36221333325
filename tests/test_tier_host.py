"""Host tier: the contract, each eviction policy, and policy behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest
from tier_contract import PAGE, BoundedTierContract, key_of, page_of

from sgl_kvext.tiers.host import HostTier
from sgl_kvext.tiers.policies import POLICIES, LFUPolicy, LRUPolicy, S3FIFOPolicy, make_policy


@pytest.mark.parametrize("policy", sorted(POLICIES))
class TestHostTierContract(BoundedTierContract):
    @pytest.fixture(autouse=True)
    def _policy(self, policy: str) -> None:
        self.policy = policy

    def make_tier(self, capacity: int) -> HostTier:
        return HostTier(capacity, self.policy, block_bytes=8192)


def test_lru_evicts_least_recently_used() -> None:
    tier = HostTier(3 * PAGE + 3 * 8192, "lru", block_bytes=8192)
    tier.put([page_of(i) for i in range(3)])
    tier.get([key_of(0)])                       # 0 is now the most recent
    evicted = tier.put([page_of(3)]).evicted
    assert [p.key for p in evicted] == [key_of(1)]


def test_lfu_evicts_least_frequently_used() -> None:
    tier = HostTier(3 * PAGE + 3 * 8192, "lfu", block_bytes=8192)
    tier.put([page_of(i) for i in range(3)])
    for _ in range(3):
        tier.get([key_of(0), key_of(2)])
    evicted = tier.put([page_of(3)]).evicted
    assert [p.key for p in evicted] == [key_of(1)]


def test_s3fifo_keeps_a_hot_key_through_a_scan() -> None:
    policy = S3FIFOPolicy()
    hot = b"hot"
    policy.admit(hot)
    policy.touch(hot)
    victims = []
    for i in range(50):                          # a one-pass scan of cold keys
        key = f"cold{i}".encode()
        policy.admit(key)
        policy.touch(hot)
        if len(policy) > 8:
            victims.append(policy.victim())
    assert hot not in victims and len(policy) == 8


def test_s3fifo_ghost_readmits_to_main() -> None:
    policy = S3FIFOPolicy()
    for i in range(20):
        policy.admit(bytes([i]))
    first = policy.victim()                      # evicted from the small queue, remembered
    policy.admit(first)
    assert first in policy._main


@pytest.mark.parametrize("cls", [LRUPolicy, LFUPolicy, S3FIFOPolicy])
def test_policy_tracks_exactly_admitted_keys(cls: type) -> None:
    policy = cls()
    keys = [bytes([i]) for i in range(30)]
    for k in keys:
        policy.admit(k)
    policy.remove(keys[5])
    policy.remove(b"never")
    out = {policy.victim() for _ in range(29)}
    assert out == set(keys) - {keys[5]} and len(policy) == 0
    with pytest.raises(LookupError):
        policy.victim()


def test_unknown_policy_lists_choices() -> None:
    with pytest.raises(ValueError, match="lru, lfu, s3fifo"):
        make_policy("mru")


def test_the_pool_reports_when_its_memory_is_faulted_in() -> None:
    tier = HostTier(64 << 20, block_bytes=1 << 20)
    assert tier.wait_populated(30)
    assert HostTier(0).wait_populated(0)               # nothing to fault in


class CpuDmaHostTierFake(HostTier):
    """The DMA paths over CPU tensors (they serve CUDA ones; there is no GPU here): the block
    runs, the eviction of a page whose copy is in flight, rejections."""

    dma_devices = ("cpu",)

    def __init__(self, capacity: int, block: int) -> None:
        super().__init__(capacity, block_bytes=block)
        self.pinned = True


def test_device_puts_and_reads_move_exactly_the_pages_bytes() -> None:
    import torch

    tier = CpuDmaHostTierFake(10 * 300, 300)                   # 10 blocks, 3 per page
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 256, (5, 800), dtype=torch.uint8, generator=g)
    keys = [key_of(i) for i in range(5)]
    result = tier.put_from_device(keys[:2], rows[:2], "uint8", (800,))
    assert result is not None and result.stored == tuple(keys[:2]) and not result.evicted
    tier.delete([keys[0]])                                      # its blocks: a hole of 3
    result = tier.put_from_device(keys[2:], rows[2:], "uint8", (800,))
    assert result is not None and [p.key for p in result.evicted] == [keys[1]]
    assert bytes(result.evicted[0].data) == rows[1].numpy().tobytes()   # read before reuse
    out = torch.zeros((4, 800), dtype=torch.uint8)
    assert tier.read_to_device(keys[1:], out, [3, 0, 1, 2]) == [False, True, True, True]
    assert torch.equal(out[:3], rows[2:]) and not out[3].any()
    assert tier.get([keys[3]])[keys[3]].data == rows[3].numpy().tobytes()   # host reads too
    big = tier.put_from_device([key_of(9)], torch.zeros((1, 3001), dtype=torch.uint8), "uint8",
                               (3001,))
    assert big is not None and big.rejected == (key_of(9),)
    assert HostTier(3000, block_bytes=300).read_to_device(keys, out, [0] * 5) is None   # unpinned


def test_a_chain_demotes_what_a_device_put_evicted_and_writes_it_through(
        tmp_path: Path) -> None:
    import torch

    from sgl_kvext.tiers.chain import TierChain
    from sgl_kvext.tiers.disk import DiskTier

    rows = torch.arange(4 * 600, dtype=torch.int64).remainder(251).to(torch.uint8).view(4, 600)
    keys = [key_of(i) for i in range(4)]
    disk = DiskTier(tmp_path / "d", 1 << 20, bytes(32), codec="none")
    chain = TierChain([CpuDmaHostTierFake(2 * 600, 600), disk])
    assert chain.put_from_device(keys, rows, "uint8", (600,))
    assert chain.flush(10.0)
    assert disk.exists(keys) == [True, True, False, False]     # the two evicted went down
    assert bytes(disk.get([keys[0]])[keys[0]].data) == rows[0].numpy().tobytes()
    lower = DiskTier(tmp_path / "t", 1 << 20, bytes(32), codec="none")
    through = TierChain([CpuDmaHostTierFake(2 * 600, 600), lower], write_policy="write_through")
    assert through.put_from_device(keys, rows, "uint8", (600,))
    rows.zero_()                                   # the caller reuses its rows at once
    assert through.flush(10.0) and lower.exists(keys) == [True] * 4
    assert bytes(lower.get([keys[3]])[keys[3]].data) != bytes(600)   # copies, not the rows
    chain.close()
    through.close()


def test_a_page_locked_pool_is_unlocked_when_closed_or_collected(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A registration outliving its mapping makes CUDA refuse the next one at that address
    ("resource already mapped", seen on an H200): closing or dropping the tier unlocks it.
    No CUDA here: the two driver calls are recorded instead."""
    import gc

    from sgl_kvext.tiers import host

    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(host, "pin_host_memory", lambda a: calls.append(("pin", a.ctypes.data))
                        or True)
    monkeypatch.setattr(host, "unpin_host_memory",
                        lambda a: calls.append(("unpin", a.ctypes.data)))
    closed = HostTier(1 << 20)
    assert closed.pinned
    closed.close()
    closed.close()                                     # once only
    dropped = HostTier(1 << 20)
    del dropped
    gc.collect()
    assert [c[0] for c in calls] == ["pin", "unpin", "pin", "unpin"]
    assert calls[0][1] == calls[1][1] and calls[2][1] == calls[3][1]


def test_pages_read_in_place_are_its_memory_rows_only_when_each_is_one_block() -> None:
    import torch

    from sgl_kvext.tiers.metrics import MeteredTier
    from sgl_kvext.tiers.objects import KVPage

    tier = MeteredTier(HostTier(8 * 256, block_bytes=256))
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (3, 200), dtype=torch.uint8, generator=g)
    keys = [key_of(i) for i in range(3)]
    tier.put([KVPage(k, d.numpy().tobytes(), "uint8", (200,))
              for k, d in zip(keys, data, strict=True)])
    seen: list[torch.Tensor] = []

    def use(rows: torch.Tensor, index: torch.Tensor) -> None:
        seen.append(rows[index, :200].clone())

    assert tier.read_in_place(keys[::-1], "uint8", (200,), use)
    assert torch.equal(seen[0], data.flip(0)) and tier.snapshot()["hits"] == 3
    # Another dtype or shape, or a page missing: False, and ``use`` is not called.
    assert not tier.read_in_place(keys, "int8", (200,), use)
    assert not tier.read_in_place(keys, "uint8", (100, 2), use)
    assert not tier.read_in_place([*keys, key_of(9)], "uint8", (200,), use)
    # A page spanning blocks is not one row.
    spanning = HostTier(8 * 64, block_bytes=64)
    spanning.put([KVPage(keys[0], data[0].numpy().tobytes(), "uint8", (200,))])
    assert not spanning.read_in_place(keys[:1], "uint8", (200,), use)
    assert len(seen) == 1 and tier.snapshot()["hits"] == 3


def test_pages_put_in_place_are_written_where_kept_and_evict_only_older_pages() -> None:
    import torch

    from sgl_kvext.tiers.objects import KVPage

    tier = HostTier(3 * 256, "lru", block_bytes=256)              # 3 one-page blocks
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (5, 200), dtype=torch.uint8, generator=g)
    keys = [key_of(i) for i in range(5)]
    tier.put([KVPage(keys[0], data[0].numpy().tobytes(), "uint8", (200,))])
    filled: list[list[int]] = []
    sent = [0, 1, 2, 1, 3]      # key 0 held (touched, not refilled); 1-3 new, 1 repeated

    def fill(rows: torch.Tensor, index: torch.Tensor, which: torch.Tensor) -> None:
        filled.append(which.tolist())
        rows[index, :200] = data[torch.tensor(sent)[which]]

    result = tier.put_in_place([keys[i] for i in sent], "uint8", (200,), fill)
    assert result is not None and filled == [[1, 2, 4]]
    assert result.stored == (keys[0], keys[1], keys[2], keys[3])
    assert [p.key for p in result.evicted] == [keys[0]]           # older than the new pages
    assert bytes(result.evicted[0].data) == data[0].numpy().tobytes()
    got = tier.get(keys)
    assert sorted(got) == sorted(keys[1:4])
    for i in (1, 2, 3):
        assert bytes(got[keys[i]].data) == data[i].numpy().tobytes()
        assert got[keys[i]].dtype == "uint8" and got[keys[i]].shape == (200,)
    # Cannot: a page over one block, a failing fill (no leak).
    assert tier.put_in_place([key_of(7)], "uint8", (300,), fill) is None

    def broken(rows: torch.Tensor, index: torch.Tensor, which: torch.Tensor) -> None:
        raise RuntimeError("fault injected")

    with pytest.raises(RuntimeError):
        tier.put_in_place([key_of(20), key_of(21)], "uint8", (200,), broken)
    assert tier.exists([key_of(20)]) == [False]
    sent = [0, 1, 2]
    assert tier.put_in_place([key_of(i) for i in range(30, 33)], "uint8", (200,), fill)
    assert tier.used_bytes == 3 * 200


def test_a_run_larger_than_the_tier_is_put_in_place_in_parts_keeping_its_last_pages() -> None:
    # 5 new pages into 3 blocks: filled 3 then 2 at a time; the run's first pages are
    # evicted like older ones, read out for the chain (a write-back tier hands them down).
    import torch

    tier = HostTier(3 * 256, "lru", block_bytes=256)
    tier.keep_evicted = True
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (5, 200), dtype=torch.uint8, generator=g)
    keys = [key_of(40 + i) for i in range(5)]
    parts: list[list[int]] = []

    def fill(rows: torch.Tensor, index: torch.Tensor, which: torch.Tensor) -> None:
        parts.append(which.tolist())
        rows[index, :200] = data[which]

    result = tier.put_in_place(keys, "uint8", (200,), fill)
    assert result is not None and parts == [[0, 1, 2], [3, 4]]
    assert result.stored == tuple(keys)
    assert [p.key for p in result.evicted] == keys[:2]
    for page, i in zip(result.evicted, (0, 1), strict=True):
        assert bytes(page.data) == data[i].numpy().tobytes()
    got = tier.get(keys)
    assert sorted(got) == sorted(keys[2:])
    for i in (2, 3, 4):
        assert bytes(got[keys[i]].data) == data[i].numpy().tobytes()
    assert tier.used_bytes == 3 * 200


def test_put_in_place_evicts_only_what_it_needs_when_a_victim_spans_blocks() -> None:
    # A fragment-sized page spans all 4 blocks; 3 one-block pages put in place evict it
    # once (it frees 4 blocks), not once per page (there is nothing else to evict).
    import torch

    from sgl_kvext.tiers.objects import KVPage

    tier = HostTier(4 * 256, "lru", block_bytes=256)
    tier.put([KVPage(key_of(60), bytes(1000), "uint8", (1000,))])
    keys = [key_of(61 + i) for i in range(3)]

    def fill(rows: torch.Tensor, index: torch.Tensor, which: torch.Tensor) -> None:
        rows[index, :200] = which.to(torch.uint8).view(-1, 1)

    result = tier.put_in_place(keys, "uint8", (200,), fill)
    assert result is not None and result.stored == tuple(keys)
    assert tier.exists([key_of(60), *keys]) == [False, True, True, True]
    assert bytes(tier.get([keys[2]])[keys[2]].data) == bytes([2]) * 200
