"""`sgl-kvext-bench merge`: a blend sweep run in slices, put back together."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import bench_cli

from sgl_kvext_bench.report import write_csv

WORKLOAD = {"corpus": "prose", "questions": 3, "documents": 6, "seed": 1}


def _slice(tmp_path: Path, name: str, methods: list[str], exact: list[str],
           workload: dict[str, object] = WORKLOAD, slower: float = 1.0,
           answer: str = "x") -> Path:
    """A blend results JSON + CSV as `sgl-kvext-bench blend` writes them; method i takes
    (1 + i) s a blend, times ``slower``."""
    path = tmp_path / f"{name}.json"
    runs = [{"method": m, "ratio": 0.15, "context": "none", "ttft_p50_s": (1.0 + i) * slower,
             "speedup": 2.0, "exact_accuracy": 0.5, "blend_accuracy": 0.4, "blend_stderr": 0.1,
             "accuracy_delta": -0.1, "delta_stderr": 0.05, "kl_mean": 0.1, "kl_median": 0.05,
             "top1_agreement": 0.9} for i, m in enumerate(methods)]
    path.write_text(json.dumps({"model": "m", "dtype": "float32", "workload": workload,
                                "questions": 3, "answer_tokens": 8, "prompt_tokens_min": 100,
                                "prompt_tokens_max": 200, "full_prefill_ttft_p50_s": 4.0,
                                "runs": runs}))
    write_csv([{"method": m, "ratio": 0.15, "question": q + 1, "exact_correct": True,
                "blend_correct": q > 0, "kl": 0.1, "top1_agree": True,
                "exact_answer": exact[q], "blend_answer": answer,
                "ttft_s": (1.0 + i) * slower}
               for i, m in enumerate(methods) for q in range(3)], path.with_suffix(".csv"))
    return path


def test_slices_over_the_same_prompts_become_one_sweep(tmp_path: Path) -> None:
    exact = ["a", "b", "c"]
    a = _slice(tmp_path, "a", ["cacheblend", "check6_query_half"], exact)
    b = _slice(tmp_path, "b", ["gradual2"], exact)
    out, png = tmp_path / "all.json", tmp_path / "plots" / "all.png"
    done = bench_cli("merge", str(a), str(b), "--json", str(out), "--plot", str(png))
    assert done.returncode == 0, done.stderr
    merged = json.loads(out.read_text())
    assert [r["method"] for r in merged["runs"]] == ["cacheblend", "check6_query_half",
                                                    "gradual2"]
    assert [p["path"] for p in merged["merged_from"]] == [str(a), str(b)]
    assert merged["workload"] == WORKLOAD
    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and {r["method"] for r in rows} == {"cacheblend", "gradual2",
                                                              "check6_query_half"}
    assert "gradual2" in done.stdout
    assert png.exists() or "plot: skipped" in done.stdout      # matplotlib is optional


def test_slices_that_do_not_belong_together_are_refused_in_one_line(tmp_path: Path) -> None:
    a = _slice(tmp_path, "a", ["cacheblend"], ["a", "b", "c"])
    cases = {
        "the exact answer of question 2": _slice(tmp_path, "b", ["gradual2"], ["a", "B", "c"]),
        "its workload differs": _slice(tmp_path, "c", ["gradual2"], ["a", "b", "c"],
                                       {**WORKLOAD, "seed": 2}),
        "cacheblend at ratio 0.15 answers otherwise than in": _slice(
            tmp_path, "d", ["cacheblend", "gradual2"], ["a", "b", "c"], answer="y"),
    }
    for message, other in cases.items():
        done = bench_cli("merge", str(a), str(other), "--json", str(tmp_path / "out.json"))
        assert done.returncode == 2, done.stdout
        assert done.stderr.strip().count("\n") == 0 and message in done.stderr, done.stderr
    done = bench_cli("merge", str(a), "--json", str(tmp_path / "out.json"))
    assert done.returncode == 2 and "at least two" in done.stderr


def test_a_repeated_run_scales_its_slice_to_the_first_and_stands_once(tmp_path: Path) -> None:
    exact = ["a", "b", "c"]
    a = _slice(tmp_path, "a", ["cacheblend", "check6_query_half"], exact)
    b = _slice(tmp_path, "b", ["cacheblend", "gradual2", "check6_query_half"], exact,
               slower=2.0)                  # a slower hour: cacheblend 2 s, check6 6 s here
    c = _slice(tmp_path, "c", ["sinks4"], exact)                    # repeats nothing
    out = tmp_path / "all.json"
    done = bench_cli("merge", str(a), str(b), str(c), "--json", str(out))
    assert done.returncode == 0, done.stderr
    merged = json.loads(out.read_text())
    runs = {r["method"]: r for r in merged["runs"]}
    assert list(runs) == ["cacheblend", "check6_query_half", "gradual2", "sinks4"]
    # b's repeats ran at 2 / 1 and 6 / 2 of a's times: geometric mean sqrt(2 * 3).
    scale = 1 / (2 * 3) ** 0.5
    assert runs["gradual2"]["ttft_p50_s"] == pytest.approx(4.0 * scale)
    assert runs["gradual2"]["speedup"] == pytest.approx(2.0 / scale)
    assert runs["cacheblend"]["ttft_p50_s"] == 1.0 and runs["sinks4"]["ttft_p50_s"] == 1.0
    assert [p["scaled_by"] for p in merged["merged_from"]] == [
        [], ["cacheblend@0.15", "check6_query_half@0.15"], []]
    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12                                    # the repeats are dropped
    assert [float(r["ttft_s"]) for r in rows if r["method"] == "gradual2"] == pytest.approx(
        [4.0 * scale] * 3, abs=1e-3)                           # the CSV keeps 3 decimals
