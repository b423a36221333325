"""Every sgl-kvext counter reaches Prometheus through the one exporter, with the right values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from sgl_kvext.pages.keys import DEFAULT_TENANT, ModelIdentity
from sgl_kvext.pages.kv_pages import PagedKV
from sgl_kvext.pages.tiering import KVTiering
from sgl_kvext.sglang_plugin.metrics_export import (
    CHAIN_COUNTERS,
    PREFETCH_COUNTERS,
    TIER_COUNTERS,
    TIERING_COUNTERS,
    MetricsExporter,
)
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.disk import DiskTier
from sgl_kvext.tiers.host import HostTier
from sgl_kvext.tiers.metrics import MeteredTier

T, LAYERS, HEADS, DIM = 4, 2, 2, 4
PAGE_BYTES = 2 * LAYERS * T * HEADS * DIM * 4
IDENTITY = ModelIdentity("cfg", "weights", "float32", T, "mha:layers=2,kv_heads=2,head_dim=4")


def _value(text: str, name: str, **labels: str) -> float:
    """The sample ``name{labels...}`` of a Prometheus text page (labels in any order)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} is not exported")


@pytest.fixture
def tiering(tmp_path: Path):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    k = [torch.randn(64, HEADS, DIM, generator=gen) for _ in range(LAYERS)]
    v = [torch.randn(64, HEADS, DIM, generator=gen) for _ in range(LAYERS)]
    host = MeteredTier(HostTier(4 * 1024, block_bytes=1024))          # 4 pages
    disk = MeteredTier(DiskTier(tmp_path, 1 << 20, bytes(32)))
    t = KVTiering(PagedKV(k, v, T), TierChain([host, disk]), IDENTITY, prefetch_threads=1)
    yield t
    t.close()


def test_every_counter_is_exported_with_its_value(tiering: KVTiering) -> None:
    assert PAGE_BYTES <= 1024
    tokens = list(range(100, 124))                                 # 6 pages: 2 demoted
    assert tiering.spill(DEFAULT_TENANT, tokens, torch.arange(24), 0) == 6
    tiering.chain.flush(timeout_s=30)
    tiering.chain.get(tiering.keys_for(DEFAULT_TENANT, tokens))    # 4 host + 2 disk hits
    registry = CollectorRegistry()
    exporter = MetricsExporter(tiering, tp_rank=0, interval_s=3600, registry=registry)
    exporter.close()                                               # a last sync
    text = generate_latest(registry).decode()
    for name in TIER_COUNTERS:
        _value(text, f"kvext_tier_{name}_total", tier="host", tp_rank="0")
    for name in CHAIN_COUNTERS:
        _value(text, f"kvext_chain_{name}_total", tp_rank="0")
    for name in TIERING_COUNTERS:
        _value(text, f"kvext_{name}_total", tp_rank="0")
    for name in PREFETCH_COUNTERS:
        _value(text, f"kvext_prefetch_{name}_total", tp_rank="0")
    assert _value(text, "kvext_spilled_pages_total") == 6
    assert _value(text, "kvext_loaded_pages_total") == 0
    assert _value(text, "kvext_chain_demoted_pages_total") == tiering.chain.counters[
        "demoted_pages"] >= 2
    assert _value(text, "kvext_tier_hits_total", tier="host") == 4
    assert _value(text, "kvext_tier_hits_total", tier="disk") == 2
    assert _value(text, "kvext_tier_ops_total", tier="host", op="put") >= 1
    assert _value(text, "kvext_tier_op_seconds_total", tier="host", op="put") > 0
    assert _value(text, "kvext_tier_capacity_bytes", tier="host") == 4 * 1024
    assert _value(text, "kvext_tier_used_bytes", tier="disk") > 0


def test_counters_are_exported_as_deltas(tiering: KVTiering) -> None:
    registry = CollectorRegistry()
    exporter = MetricsExporter(tiering, tp_rank=1, interval_s=3600, registry=registry)
    tiering.spill(DEFAULT_TENANT, list(range(8)), torch.arange(8), 0)
    exporter.sync()
    exporter.sync()                                                # nothing new: no double count
    tiering.spill(DEFAULT_TENANT, list(range(8, 12)), torch.arange(8, 12), 0)
    exporter.close()
    text = generate_latest(registry).decode()
    assert _value(text, "kvext_spilled_pages_total", tp_rank="1") == 3
