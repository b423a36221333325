"""sgl-kvext-bench blend on a tiny set, the RAG sets it ships (synthetic and prose) and the
quality harness it shares with the server benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sgl_kvext_bench.blend import METHODS
from sgl_kvext_bench.prose_set import make_prose_set
from sgl_kvext_bench.quality import Pair, kl_full, kl_top, load_results, summarize
from sgl_kvext_bench.rag_set import MAX_FACTS, RagSpec, is_correct, make_rag_set


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


def test_prose_set_carries_one_answer_per_question_in_sized_documents(
        n_tokens: Callable[[str], int]) -> None:
    rag = make_prose_set(documents=40, questions=30, seed=2)
    assert rag == make_prose_set(documents=40, questions=30, seed=2)
    assert RagSpec(documents=40, questions=30, seed=2, corpus="prose").build() == rag
    sizes = [n_tokens(d) for d in rag.documents]
    assert 150 <= min(sizes) and max(sizes) <= 850, sizes
    assert len(set(rag.documents)) == len(rag.documents)
    for q in rag.questions:
        assert 4 <= len(q.documents) <= 8 and q.answer_document in q.documents
        assert f"{q.stem} {q.answer}." in rag.documents[q.answer_document]
        assert not any(f"{q.stem} " in rag.documents[d] for d in q.documents
                       if d != q.answer_document)
    with pytest.raises(ValueError, match="help topics hold"):
        make_prose_set(documents=400)


def test_facts_are_distinct_up_to_the_limit() -> None:
    rag = make_rag_set(documents=300, questions=5, chunks=(4, 8), sentences=2)
    stems = {d.split(". ", 1)[1] for d in rag.documents}
    assert len(stems) == 300 and MAX_FACTS >= 300
    with pytest.raises(ValueError, match="distinct facts"):
        make_rag_set(documents=MAX_FACTS + 1, questions=1, sentences=2)


def test_rag_set_refuses_impossible_sizes() -> None:
    with pytest.raises(ValueError, match="documents"):
        make_rag_set(documents=3, chunks=(4, 8))


def test_scoring_reads_the_answer_before_the_first_period() -> None:
    assert is_correct(" 4821. It is written down.", "4821")
    assert not is_correct(" 1234. Not 4821.", "4821")


@pytest.mark.bench
@pytest.mark.extended
def test_blend_bench_tiny(tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "blend.json"
    result = subprocess.run(
        [sys.executable, "-m", "sgl_kvext_bench.cli", "blend", "--json", str(out),
         "--questions", "2", "--documents", "8", "--sentences", "4", "--answer-tokens", "4",
         "--ratios", "0,0.15,1.0",
         "--methods", "cacheblend,query_half,head_context,check6_query_half_fallback",
         "--dtype", "float32", "--model-path", str(model_path),
         "--plot", str(tmp_path / "blend.png"), "--reference-cache", str(tmp_path / "ref")],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| method | ratio |" in result.stdout
    data = json.loads(out.read_text())
    assert data["references_cached"] == 0 and len(list((tmp_path / "ref").glob("*.pt"))) == 2
    runs = {(e["method"], e["ratio"]): e for e in data["runs"]}
    assert len(runs) == 12
    for e in data["runs"]:
        assert {"ttft_p50_s", "speedup", "exact_accuracy", "blend_accuracy", "exact_stderr",
                "delta_stderr", "kl_mean", "kl_median", "top1_agreement",
                "flipped_to_wrong"} <= set(e)
    for method in ("cacheblend", "query_half"):
        full = runs[method, 1.0]     # ratio 1 recomputes everything: the exact prefill
        assert full["top1_agreement"] == 1.0 and full["kl_mean"] < 1e-6
        assert full["blend_accuracy"] == full["exact_accuracy"]
        assert runs[method, 0.0]["kl_mean"] > full["kl_mean"]
    # Computed after the head, a chunk's KV is another approximation: not exact at ratio 0.
    assert runs["head_context", 0.0]["kl_mean"] != runs["cacheblend", 0.0]["kl_mean"]
    # The fallback prefills again, exactly, exactly where the blended answer was uncertain.
    gate = METHODS["check6_query_half_fallback"].fallback_entropy
    for row in load_results(out)["rows"]:                 # from the CSV: strings
        fell_back = row["fell_back"] in ("1", "True")
        assert fell_back == (row["method"] == "check6_query_half_fallback"
                             and float(row["blend_entropy"]) > gate)
        if fell_back:
            assert row["kl"] < 1e-6 and row["blend_answer"] == row["exact_answer"]
    rows = (tmp_path / "blend.csv").read_text().splitlines()
    assert len(rows) == 1 + 12 * 2 and rows[0].startswith("method,ratio,question")
    png = (tmp_path / "blend.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_reference_cache_computes_each_prompt_once_and_recomputes_a_damaged_entry(
        tmp_path: Path) -> None:
    import torch

    from sgl_kvext_bench.reference_cache import Reference, ReferenceCache

    calls: list[list[int]] = []

    def compute(ids: torch.Tensor) -> Reference:
        calls.append(ids.tolist())
        return Reference(torch.arange(5.0) * len(calls), f"answer {len(calls)}", 1.5)

    cache = ReferenceCache(tmp_path, "model", "float32", 8, {2, 1})
    a, b = torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4])
    first = cache.get(a, compute)
    assert not first.cached and calls == [[1, 2, 3]]
    again = cache.get(a, compute)
    assert again.cached and again.answer == "answer 1" and again.ttft_s == 1.5
    assert torch.equal(again.last_logits, first.last_logits) and len(calls) == 1
    assert not cache.get(b, compute).cached and len(calls) == 2      # other tokens
    other = ReferenceCache(tmp_path, "model", "bfloat16", 8, {1, 2})  # other dtype
    assert not other.get(a, compute).cached and len(calls) == 3
    path = cache.path(a)
    assert path is not None
    path.write_bytes(b"not a tensor file")
    assert not cache.get(a, compute).cached and len(calls) == 4       # damaged: recomputed
    assert cache.get(a, compute).answer == "answer 4"
    assert ReferenceCache(None, "model", "float32", 8, ()).path(a) is None


def test_kl_over_the_top_tokens_is_a_lower_bound_of_the_full_kl() -> None:
    import torch

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        p, q = torch.randn(500, generator=gen) * 3, torch.randn(500, generator=gen) * 3
        lp, lq = torch.log_softmax(p.double(), -1), torch.log_softmax(q.double(), -1)
        top = torch.topk(lp, 20).indices.tolist()
        bound = kl_top({t: float(lp[t]) for t in top}, {t: float(lq[t]) for t in top})
        assert 0 <= bound <= kl_full(p, q) + 1e-9
    same = {1: -0.1, 2: -2.5}
    assert kl_top(same, same) == 0.0
    with pytest.raises(ValueError, match="every token"):
        kl_top({1: -0.1}, {2: -0.1})


def test_summary_pairs_each_question_and_lists_flips() -> None:
    pairs = [Pair(0, True, True, 0.01, True), Pair(1, True, False, 0.5, False),
             Pair(2, False, True, 0.02, True), Pair(3, False, False, 0.03, True)]
    s = summarize(pairs)
    assert s["exact_accuracy"] == s["blend_accuracy"] == 0.5 and s["accuracy_delta"] == 0.0
    assert s["flipped_to_wrong"] == [1] and s["flipped_to_right"] == [2]
    assert s["kl_median"] == 0.025 and s["top1_agreement"] == 0.75
    assert s["exact_stderr"] > 0 and s["delta_stderr"] > 0


def test_blend_bench_rejects_bad_ratios(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sgl_kvext_bench.cli", "blend", "--json",
         str(tmp_path / "x.json"), "--ratios", "0.1,2"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--ratios" in result.stderr
