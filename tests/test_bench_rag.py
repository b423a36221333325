"""sgl-kvext-bench rag: the workload's knobs, and a tiny set on two real servers (the JSON it
promises, pre-warmed chunks served from the fragment store)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import bench_cli

from sgl_kvext.harness.server import dtype_flags
from sgl_kvext_bench.rag_set import RagSpec, sentences_for


def test_default_set_is_the_one_the_recorded_numbers_used() -> None:
    # docs/benchmarks.md's RAG numbers were measured on this set: a change here reruns them.
    rag = RagSpec().build()
    assert hashlib.sha256(repr(rag).encode()).hexdigest()[:16] == "86f628a4c7254702"


def test_skew_concentrates_prompts_on_popular_documents() -> None:
    def top_share(skew: float) -> float:
        rag = RagSpec(documents=24, questions=200, chunks=(2, 4), sentences=4,
                      skew=skew).build()
        counts = Counter(d for q in rag.questions for d in q.documents)
        return sum(n for _, n in counts.most_common(3)) / sum(counts.values())

    assert top_share(0.0) < 0.25 < 0.4 < top_share(1.5)


def test_order_and_facts_per_document() -> None:
    rag = RagSpec(documents=12, questions=40, chunks=(3, 3), sentences=6, shuffle=False,
                  facts_per_document=2).build()
    assert all(list(q.documents) == sorted(q.documents) for q in rag.questions)
    assert all(len(q.documents) == 3 and q.answer_document in q.documents
               for q in rag.questions)
    asked: dict[int, set[str]] = {}
    for q in rag.questions:
        assert q.answer in rag.documents[q.answer_document]
        asked.setdefault(q.answer_document, set()).add(q.question)
    assert max(len(v) for v in asked.values()) == 2          # two questions on one document
    assert len({q.question for q in rag.questions}) <= 24


def test_chunk_tokens_sizes_documents(n_tokens: Callable[[str], int]) -> None:
    for target in (100, 500):
        rag = RagSpec(sentences=sentences_for(target)).build()
        mean = sum(n_tokens(d) for d in rag.documents) / len(rag.documents)
        assert 0.85 * target < mean < 1.15 * target


@pytest.mark.parametrize("flags, needle", [
    (["--chunks-per-query", "4-x"], "--chunks-per-query"),
    (["--chunks-per-query", "9-12", "--documents", "8"], "documents >= max chunks"),
    (["--facts-per-document", "3", "--documents", "200"], "distinct facts"),
    (["--skew", "-1"], "skew"),
    (["--chunk-tokens", "10"], "--chunk-tokens"),
])
def test_rag_bench_rejects_bad_workloads_in_one_line(tmp_path: Path, flags: list[str],
                                                     needle: str) -> None:
    result = bench_cli("rag", "--json", str(tmp_path / "x.json"), *flags)
    assert result.returncode == 2 and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.bench
@pytest.mark.extended
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
    assert rows[0] == ("config,question,ttft_s,correct,prompt_tokens,cached_tokens,"
                       "exact_correct,kl,top1_agree")
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
    # Every question blended, or thrown away as a close call (default gate, 3 nats).
    assert fragment["blends"] + fragment.get("close_calls", 0) >= 2
    assert fragment["blended_tokens"] > 0 or fragment["blends"] == 0
    # Each blended answer beside the exact answer of its prompt, and what each blend did.
    quality = by_name["hierarchical_blend"]["quality"]
    assert quality["questions"] == 2 and quality["kl_mean"] >= 0
    assert quality["top1_agreement"] in (0.0, 0.5, 1.0)
    assert "quality" not in by_name["radix"]
    reports = by_name["hierarchical_blend"]["blend_reports"]
    assert set(reports["outcomes"]) <= {"blended", "close_call"}
    assert sum(reports["outcomes"].values()) == 2 and reports["marked_used"] >= 8
    assert reports["reused_tokens_mean"] > reports["recomputed_tokens_mean"] > 0
    assert "hierarchical_blend_p50_speedup_vs_radix" in data
    assert data["server_args"] == list(dtype_flags(()))   # the CPU's fast dtype, recorded


def test_rag_bench_rejects_unknown_configs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sgl_kvext_bench.cli", "rag", "--json",
         str(tmp_path / "x.json"), "--configs", "radix,turbo"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "turbo" in result.stderr
