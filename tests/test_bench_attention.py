"""sgl-kvext-bench attention on tiny prompts: both backends served, the JSON it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.bench
@pytest.mark.extended
def test_attention_bench_tiny(tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "attention.json"
    result = subprocess.run(
        [sys.executable, "-m", "sgl_kvext_bench.cli", "attention", "--json", str(out),
         "--lengths", "64,160", "--repeats", "1", "--model-path", str(model_path)],
        capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| backend | prompt tokens |" in result.stdout
    data = json.loads(out.read_text())
    assert sorted(data["backends"]) == ["kvext_cpu", "torch_native"]
    for per_length in data["backends"].values():
        for n in (64, 160):
            row = per_length[str(n)]
            assert row["cached_tokens"] == [n - 1]      # the second send reused all but one
            assert row["cold_p50_s"] > 0 and row["cached_p50_s"] > 0
    assert set(data["ratios"]) == {"64", "160"}
    assert {"cached_speedup_vs_torch_native_cached", "cached_speedup_vs_cold",
            "cold_time_vs_torch_native_cold"} <= set(data["ratios"]["160"])


@pytest.mark.parametrize("flags, needle", [
    (["--backends", "torch_native,flash"], "flash"),
    (["--lengths", "1024,x"], "--lengths"),
    (["--repeats", "0"], "--repeats"),
])
def test_attention_bench_rejects_bad_options(tmp_path: Path, flags: list[str],
                                             needle: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sgl_kvext_bench.cli", "attention", "--json",
         str(tmp_path / "x.json"), *flags], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command, first, second, header, runs", [
    ("attention-layouts", "gathered", "views", "| case | gathered (ms) | views (ms) |", {1, 3, 4}),
    ("attention-calls", "split", "one_call", "| case | split (ms) | one call (ms) |",
     {1, 2, 3, 4}),
])
def test_in_process_attention_benches_time_both_ways_of_every_case(
        tmp_path: Path, command: str, first: str, second: str, header: str,
        runs: set[int]) -> None:
    out = tmp_path / "cases.json"
    result = subprocess.run(
        [sys.executable, "-m", "sgl_kvext_bench.cli", command, "--json", str(out),
         "--repeats", "1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert header in result.stdout
    cases = json.loads(out.read_text())["cases"]
    assert len(cases) == 6 and {c["runs"] for c in cases.values()} == runs
    for case in cases.values():
        assert case[f"{first}_ms"] > 0 and case[f"{second}_ms"] > 0
        assert case["speedup"] == pytest.approx(case[f"{first}_ms"] / case[f"{second}_ms"])


def test_attention_layouts_rejects_zero_repeats(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sgl_kvext_bench.cli", "attention-layouts", "--json",
         str(tmp_path / "x.json"), "--repeats", "0"], capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 2 and "--repeats must be >= 1" in result.stderr
    assert result.stderr.count("\n") == 1
