"""Building the chain from TierConfig: which tiers, in which order, with which settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from tier_contract import assert_same, key_of, page_of

from sgl_kvext.config.settings import TierConfig
from sgl_kvext.harness.seaweedfs import SeaweedFS
from sgl_kvext.tiers.factory import build_chain

NS = bytes(range(32))


def test_full_chain_host_disk_s3(tmp_path: Path, seaweed: SeaweedFS) -> None:
    config = TierConfig(host_size="1MiB", disk_dir=tmp_path / "disk", disk_size="64MiB",
                        s3_url="s3://kvext-factory/run1", s3_endpoint=seaweed.endpoint,
                        eviction_policy="s3fifo", write_policy="write_through", codec="zstd")
    chain = build_chain(config, NS, seaweed.credentials)
    assert [t.name for t in chain.tiers] == ["host", "disk", "s3"]
    assert chain.write_policy == "write_through"
    pages = [page_of(i) for i in range(3)]
    chain.put(pages)
    chain.flush()
    for tier in chain.tiers:
        assert tier.exists([p.key for p in pages]) == [True] * 3, tier.name
    got = chain.tiers[2].get([key_of(1)])
    assert_same(got[key_of(1)], pages[1])
    snapshots = [t.snapshot() for t in chain.tiers]
    assert all(s["bytes_in"] > 0 for s in snapshots)
    chain.close()


def test_disabled_tiers_are_left_out(tmp_path: Path) -> None:
    chain = build_chain(TierConfig(host_size=0, disk_dir=tmp_path), NS)
    assert [t.name for t in chain.tiers] == ["disk"]
    chain.close()
    with pytest.raises(ValueError, match="every tier is disabled"):
        build_chain(TierConfig(host_size=0), NS)
