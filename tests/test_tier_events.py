"""Tier residency as SGLang KV events: the buffer's conversion and bound (TierEventLog), and
the tree publishing them with the device tree's own events (real SGLang pool and tree)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sglang.srt.disaggregation.kv_events import BlockRemoved, BlockStored
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from test_tree import Harness, seq

from sgl_kvext.pages.keys import DEFAULT_TENANT
from sgl_kvext.sglang_plugin.tier_events import TierEventLog, block_hash
from sgl_kvext.tiers.chain import TierEvent

pytestmark = pytest.mark.unit


def test_events_become_sglang_blocks_with_the_tier_as_medium() -> None:
    log = TierEventLog(["host", "disk", "s3"], page_tokens=32)
    a, b = bytes(range(32)), bytes(range(1, 33))
    log.add(TierEvent(True, 0, (a, b)))
    log.add(TierEvent(False, 0, (a,)))
    log.add(TierEvent(True, 2, (a,)))
    got = log.take()
    assert [type(e) for e in got] == [BlockStored, BlockRemoved, BlockStored]
    assert got[0].block_hashes == [block_hash(a), block_hash(b)]
    assert got[0].medium == "CPU_PINNED" and got[0].block_size == 32
    assert got[0].token_ids == [] and got[0].parent_block_hash is None
    assert got[1].medium == "CPU_PINNED" and got[2].medium == "EXTERNAL"
    assert block_hash(a) == int.from_bytes(a[:8], "big", signed=True)
    assert log.take() == []


def test_the_buffer_drops_the_oldest_pages_past_its_bound() -> None:
    log = TierEventLog(["host", "disk"], page_tokens=32, max_pages=3)
    for i in range(5):
        log.add(TierEvent(True, 1, (bytes([i]) * 32,)))
    got = log.take()
    assert [e.block_hashes for e in got] == [[block_hash(bytes([i]) * 32)] for i in (2, 3, 4)]
    assert got[0].medium == "DISK" and log.dropped_pages == 2


def test_the_tree_publishes_tier_events_only_when_kv_events_are_on(tmp_path: Path) -> None:
    quiet = Harness(tmp_path / "quiet")
    quiet.insert(seq(1000, 40))
    quiet.tree.evict(EvictParams(num_tokens=1000))
    assert quiet.tree.take_events() == []                  # SGLang's events are off too
    quiet.close()

    h = Harness(tmp_path / "on", kv_events=True)
    a = seq(1000, 40)                                       # 5 pages of 8
    h.insert(a)
    h.tree.evict(EvictParams(num_tokens=1000))             # spilled to the host tier
    events = h.tree.take_events()
    device = [e for e in events if getattr(e, "medium", None) == "GPU"]
    host = [e for e in events if getattr(e, "medium", None) == "CPU_PINNED"]
    assert any(isinstance(e, BlockRemoved) for e in device)   # SGLang's own, unchanged
    keys = h.tiering.keys_for(DEFAULT_TENANT, a)
    assert [isinstance(e, BlockStored) for e in host] == [True]
    assert host[0].block_hashes == [block_hash(k) for k in keys]
    assert h.tree.take_events() == []
    h.close()
