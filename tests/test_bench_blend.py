"""sgl-kvext-bench blend on a tiny set, and the synthetic RAG set it ships."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sgl_kvext_bench.rag_set import is_correct, make_rag_set


def test_rag_set_is_seeded_and_every_answer_is_in_its_prompt() -> None:
    rag = make_rag_set(documents=16, questions=10, chunks=(4, 8), sentences=6, seed=3)
    assert rag == make_rag_set(documents=16, questions=10, chunks=(4, 8), sentences=6, seed=3)
    assert rag != make_rag_set(documents=16, questions=10, chunks=(4, 8), sentences=6, seed=4)
    for q in rag.questions:
        assert 4 <= len(q.documents) <= 8 and len(set(q.documents)) == len(q.documents)
        assert q.answer_document in q.documents
        assert f"{q.stem} {q.answer}." in rag.documents[q.answer_document]
        others = [rag.documents[d] for d in q.documents if d != q.answer_document]
        assert not any(f"{q.stem} " in doc for doc in others)   # one document answers


def test_rag_set_refuses_impossible_sizes() -> None:
    with pytest.raises(ValueError, match="documents"):
        make_rag_set(documents=3, chunks=(4, 8))


def test_scoring_reads_the_answer_before_the_first_period() -> None:
    assert is_correct(" 4821. It is written down.", "4821")
    assert not is_correct(" 1234. Not 4821.", "4821")


def test_blend_bench_tiny(tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "blend.json"
    result = subprocess.run(
        [sys.executable, "-m", "sgl_kvext_bench.cli", "blend", "--json", str(out),
         "--questions", "2", "--documents", "8", "--sentences", "4", "--answer-tokens", "4",
         "--ratios", "0,0.15,1.0", "--model-path", str(model_path),
         "--plot", str(tmp_path / "blend.png")],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| ratio |" in result.stdout
    data = json.loads(out.read_text())
    by_ratio = {e["ratio"]: e for e in data["ratios"]}
    assert sorted(by_ratio) == [0.0, 0.15, 1.0]
    for e in data["ratios"]:
        assert {"ttft_s", "full_prefill_ttft_s", "accuracy", "full_prefill_accuracy",
                "agreement_32", "kl_first_token"} <= set(e)
    full = by_ratio[1.0]             # ratio 1 recomputes everything: the full prefill's answer
    assert full["agreement_32"] == 1.0 and full["kl_first_token"] < 1e-6
    assert full["accuracy"] == full["full_prefill_accuracy"]
    assert by_ratio[0.0]["kl_first_token"] > full["kl_first_token"]
    png = (tmp_path / "blend.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_blend_bench_rejects_bad_ratios(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sgl_kvext_bench.cli", "blend", "--json",
         str(tmp_path / "x.json"), "--ratios", "0.1,2"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--ratios" in result.stderr
