"""sgl-kvext-bench multiturn on a tiny workload: every configuration runs and is reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.bench
@pytest.mark.extended
def test_multiturn_bench_tiny(tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "mt.json"
    result = subprocess.run(
        [sys.executable, "-m", "sgl_kvext_bench.cli", "multiturn", "--json", str(out),
         "--users", "2", "--turns", "2", "--system-words", "30", "--question-words", "10",
         "--answer-tokens", "3", "--no-host-hit"],
        capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["configs"]] == ["no_cache", "radix", "hierarchical"]
    for config in data["configs"]:
        assert config["ttft_p50_s"] > 0 and config["ttft_p90_s"] >= config["ttft_p50_s"]
        assert len(config["requests"]) == 4
    turn2 = [r for r in data["configs"][2]["requests"] if r["turn"] == 2]
    assert all(r["cached_tokens"] > 0 for r in turn2)   # the history came from the cache
    assert data["pool_tokens"] > 0 and "p50_speedup_vs_radix" in data
    assert "| hierarchical |" in result.stdout
    assert f"plot: {out.with_suffix('.png')}" in result.stdout
    assert out.with_suffix(".png").stat().st_size > 10_000
    # The server's own counters came back from /metrics: pages were spilled to the host tier.
    counters = data["configs"][2]["kvext_counters"]
    assert counters["flow"]["spilled_pages"] > 0 and counters["host"]


@pytest.mark.parametrize("flags, needle", [
    (["--configs", "radix,magic"], "magic"),
    (["--host-hit-rounds", "0"], "--host-hit-rounds must be >= 1"),
])
def test_bad_options_are_one_line(flags: list[str], needle: str) -> None:
    result = subprocess.run([sys.executable, "-m", "sgl_kvext_bench.cli", "multiturn", "--json",
                             "x.json", *flags], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and needle in result.stderr
    assert result.stderr.count("\n") == 1
