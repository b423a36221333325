"""sgl-kvext-bench soak on a short run: RSS of every server process is sampled, the host
tier stays within its cap, no request fails; process-group RSS reading works."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import bench_cli

from sgl_kvext_bench.soak import SoakSpec, group_rss, summarize


def test_group_rss_finds_this_process() -> None:
    mine = group_rss(os.getpgrp())
    assert any(name.startswith(f"{os.getpid()} ") for name in mine)
    assert all(rss > 0 for rss in mine.values())


def test_summary_flags_growth_after_warm_up() -> None:
    spec = SoakSpec(minutes=1.0, warmup_share=0.5, tolerance=0.05)
    grow = [{"t_s": t, "rss": {"1 sched": 100 + t}, "host_used_bytes": 10} for t in (0, 30, 60)]
    flat = [{"t_s": t, "rss": {"1 sched": 100}, "host_used_bytes": 10} for t in (0, 30, 60)]
    assert not summarize(spec, grow, {}, 100)["rss_flat"]          # 130 -> 160: +23%
    assert summarize(spec, flat, {}, 100)["rss_flat"]
    assert not summarize(spec, flat, {}, 5)["host_within_cap"]


@pytest.mark.server
def test_soak_tiny(tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "soak.json"
    result = bench_cli("soak", "--json", str(out), "--minutes", "1", "--sample-s", "3",
                       "--host-size", "64MiB", "--model-path", str(model_path), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["errors"] == 0 and data["chat"] >= 1 and data["rag"] >= 1
    assert len(data["samples"]) >= 3 and len(data["processes"]) >= 2   # server + scheduler
    assert max(p["rss_warm_bytes"] for p in data["processes"]) > 200 << 20
    assert 0 < data["host_used_max_bytes"] <= data["host_cap_bytes"] == 64 << 20
    assert data["host_within_cap"]
    assert "| process |" in result.stdout and out.with_suffix(".png").stat().st_size > 10_000
