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


def test_an_object_key_file_makes_the_tiers_refuse_objects_made_without_it(
        tmp_path: Path) -> None:
    from sgl_kvext.config.settings import ConfigError
    from sgl_kvext.tiers.factory import build_tiers
    from sgl_kvext.tiers.objects import KVPage

    key = tmp_path / "object.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        TierConfig(disk_dir=tmp_path / "d", object_key_file=key)
    key.chmod(0o600)
    page = KVPage(bytes(range(32)), bytes(range(256)) * 16, "uint8", (4096,))
    plain = build_tiers(TierConfig(host_size=0, disk_dir=tmp_path / "d"), NS)[0]
    plain.put([page])
    keyed = build_tiers(TierConfig(host_size=0, disk_dir=tmp_path / "d", object_key_file=key),
                        NS)[0]
    assert keyed.get([page.key]) == {}              # made without the key: a miss ...
    assert keyed.inner.stats()["quarantined"] == 1  # ... and quarantined
    keyed.put([page])
    assert bytes(keyed.get([page.key])[page.key].data) == page.data
    assert plain.get([page.key]) == {}             # and the other way round
    short = tmp_path / "short.key"
    short.write_bytes(b"tiny")
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="at least 16"):
        TierConfig(object_key_file=short)


def test_an_encryption_key_file_makes_the_disk_tier_store_ciphertext(tmp_path: Path) -> None:
    from sgl_kvext.config.settings import ConfigError
    from sgl_kvext.tiers.factory import build_tiers
    from sgl_kvext.tiers.objects import KVPage

    key = tmp_path / "encryption.key"
    key.write_bytes(b"e" * 32)
    key.chmod(0o600)
    page = KVPage(bytes(range(32)), bytes(range(256)) * 16, "uint8", (4096,))
    config = TierConfig(host_size=0, disk_dir=tmp_path / "d", codec="none",
                        encryption_key_file=key)
    sealed = build_tiers(config, NS)[0]
    sealed.put([page])
    stored = [p.read_bytes() for p in (tmp_path / "d").rglob("*.kvx")]
    assert len(stored) == 1 and bytes(range(256)) not in stored[0]   # no KV in the clear
    assert bytes(sealed.get([page.key])[page.key].data) == page.data
    plain = build_tiers(TierConfig(host_size=0, disk_dir=tmp_path / "d"), NS)[0]
    assert plain.get([page.key]) == {}             # a reader without the key: a miss
    with pytest.raises(ConfigError, match="one of the two"):
        TierConfig(object_key_file=key, encryption_key_file=key)
