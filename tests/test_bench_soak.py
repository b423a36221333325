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


def _series(values: dict[int, int]) -> list[dict[str, object]]:
    return [{"t_s": t, "rss": {"1 sched": v}, "host_used_bytes": 10} for t, v in values.items()]


def test_summary_flags_growth_after_warm_up() -> None:
    spec = SoakSpec(minutes=1.0, warmup_share=0.5, tolerance=0.05)
    grow = _series({0: 100, 30: 130, 60: 160})
    flat = _series({0: 100, 30: 100, 60: 100})
    assert not summarize(spec, grow, grow, {}, 100)["rss_flat"]    # floor 130 -> 160: +23%
    assert summarize(spec, flat, flat, {}, 100)["rss_flat"]
    assert not summarize(spec, flat, flat, {}, 5)["host_within_cap"]


def test_summary_holds_floors_to_the_tolerance_and_reports_peaks() -> None:
    spec = SoakSpec(minutes=10.0, warmup_share=0.0, tolerance=0.05, windows=4)
    # At rest the server returns to 100 after every request; periodic samples land inside
    # prefills (up to 160): flat, with a +60% peak.
    rest = _series({t: 100 + (t % 30 == 0) * 3 for t in range(0, 600, 10)})
    busy = _series({t: 160 if t % 70 == 0 else 120 for t in range(0, 600, 10)})
    flat = summarize(spec, busy, rest, {}, 1)
    assert flat["rss_flat"]
    assert flat["processes"][0]["growth"] == 1.0
    assert flat["processes"][0]["peak_over_floor"] == 1.6
    # A leak lifts the floor: 100 -> ~129 at rest.
    leak = _series({t: 100 + t // 20 for t in range(0, 600, 10)})
    assert not summarize(spec, busy, leak, {}, 1)["rss_flat"]


@pytest.mark.soak
@pytest.mark.extended
def test_soak_tiny(tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "soak.json"
    result = bench_cli("soak", "--json", str(out), "--minutes", "1", "--sample-s", "3",
                       "--host-size", "64MiB", "--model-path", str(model_path), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["errors"] == 0 and data["chat"] >= 1 and data["rag"] >= 1
    assert len(data["samples"]) >= 3 and len(data["processes"]) >= 2   # server + scheduler
    assert len(data["at_rest"]) == data["requests"]
    assert max(p["rss_window_floors_bytes"][0] for p in data["processes"]) > 200 << 20
    assert 0 < data["host_used_max_bytes"] <= data["host_cap_bytes"] == 64 << 20
    assert data["host_within_cap"]
    assert "| process |" in result.stdout and out.with_suffix(".png").stat().st_size > 10_000
