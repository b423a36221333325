"""sgl-kvext-bench rag on a tiny set: two real servers, the JSON it promises, pre-warmed
chunks served from the fragment store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.server


def test_rag_bench_tiny(tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "rag.json"
    result = subprocess.run(
        [sys.executable, "-m", "sgl_kvext_bench.cli", "rag", "--json", str(out),
         "--configs", "radix,hierarchical_blend", "--questions", "2", "--documents", "8",
         "--sentences", "6", "--answer-tokens", "4", "--model-path", str(model_path)],
        capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| configuration |" in result.stdout
    assert f"plot: {out.with_suffix('.png')}" in result.stdout
    assert out.with_suffix(".png").stat().st_size > 10_000
    rows = out.with_suffix(".csv").read_text().splitlines()
    assert rows[0] == "config,question,ttft_s,correct,prompt_tokens,cached_tokens"
    assert len(rows) == 1 + 2 * 2                  # two configurations x two questions
    data = json.loads(out.read_text())
    by_name = {c["name"]: c for c in data["configs"]}
    assert sorted(by_name) == ["hierarchical_blend", "radix"]
    for c in data["configs"]:
        assert {"ttft_p50_s", "ttft_p90_s", "accuracy"} <= set(c)
        assert len(c["questions"]) == 2
    # Pre-warmed, marked documents: most of each prompt comes from the fragment store.
    for q in by_name["hierarchical_blend"]["questions"]:
        assert q["cached_tokens"] >= 0.5 * q["prompt_tokens"], q
    assert by_name["hierarchical_blend"]["prewarm_s"] > 0
    fragment = by_name["hierarchical_blend"]["kvext_counters"]["fragment"]   # from /metrics
    assert fragment["blends"] >= 2 and fragment["blended_tokens"] > 0
    assert "hierarchical_blend_p50_speedup_vs_radix" in data


def test_rag_bench_rejects_unknown_configs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sgl_kvext_bench.cli", "rag", "--json",
         str(tmp_path / "x.json"), "--configs", "radix,turbo"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "turbo" in result.stderr
