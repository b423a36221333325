"""Metered tiers: the contract still holds, counters are right (exported by
``sglang_plugin.metrics_export``, tested in test_metrics_export.py)."""

from __future__ import annotations

from pathlib import Path

from tier_contract import PAGE, BoundedTierContract, key_of, page_of

from sgl_kvext.tiers.disk import DiskTier
from sgl_kvext.tiers.host import HostTier
from sgl_kvext.tiers.metrics import MeteredTier


class TestMeteredHostContract(BoundedTierContract):
    def make_tier(self, capacity: int) -> MeteredTier:
        return MeteredTier(HostTier(capacity, block_bytes=8192))


def test_counters_and_latency(tmp_path: Path) -> None:
    host = MeteredTier(HostTier(2 * PAGE, block_bytes=PAGE))
    disk = MeteredTier(DiskTier(tmp_path, 100 * PAGE, bytes(32)))
    host.put([page_of(1), page_of(2), page_of(3)])           # one eviction
    host.get([key_of(2), key_of(3), key_of(9)])              # two hits, one miss
    disk.put([page_of(1)])
    path = next((tmp_path / "objects").rglob("*.kvx"))
    path.write_bytes(b"garbage")
    disk.get([key_of(1)])                                    # corrupt: miss + quarantine
    snap = host.snapshot()
    assert (snap["hits"], snap["misses"], snap["evictions"]) == (2, 1, 1)
    assert snap["bytes_in"] == 3 * PAGE and snap["bytes_out"] == 2 * PAGE
    assert snap["latency"]["get"]["count"] == 1
    assert disk.snapshot()["quarantined"] == 1 and disk.snapshot()["misses"] == 1
    disk.close()
