"""RAG serving benchmark: the same questions over shuffled documents, four server set-ups.

Every prompt is a system line, 4-8 documents of the synthetic RAG set in shuffled order, the
question and the answer's stem (``rag_set.py``); answers are greedy and scored against the
gold value. Requests go one at a time and stream, so TTFT has no queueing. Set-ups, one server
each, one after another, at the server's default dtype:

- ``no_cache``: ``--disable-radix-cache``;
- ``radix``: SGLang's default radix cache (only the shared system line is a prefix);
- ``hierarchical``: ``--enable-hierarchical-kv`` (evicted KV spills to host memory);
- ``hierarchical_blend``: plus ``--kvext-fragment-blend``; the corpus is pre-warmed once
  (``prewarm_corpus``, not timed) and each request marks its documents (``kvext_chunks``);
- ``hierarchical_blend_auto`` (optional): the same without marks, automatic chunks only.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sgl_kvext.prewarm_client import prewarm_corpus
from sgl_kvext_bench.client import kvext_counters, stream_generate
from sgl_kvext_bench.rag_set import RagQuestion, RagSet, is_correct, make_rag_set
from sgl_kvext_bench.serving import URL_CONFIG, served

HIER = ("--enable-hierarchical-kv", "--kvext-host-size", "4GiB", "--enable-metrics")
BLEND = (*HIER, "--kvext-fragment-blend")
CONFIGS: dict[str, tuple[str, ...]] = {
    "no_cache": ("--disable-radix-cache",),
    "radix": (),
    "hierarchical": HIER,
    "hierarchical_blend": BLEND,
    "hierarchical_blend_auto": BLEND,
}
DEFAULT_CONFIGS = ("no_cache", "radix", "hierarchical", "hierarchical_blend")
HEAD = "<|im_start|>system\nAnswer the question from the documents.<|im_end|>\n<|im_start|>user\n"


def prompt_text(rag: RagSet, q: RagQuestion) -> str:
    docs = "".join(rag.documents[d] for d in q.documents)
    return f"{HEAD}{docs}Question: {q.question}<|im_end|>\n<|im_start|>assistant\n{q.stem}"


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_config(model_path: Path | None, name: str, rag: RagSet, answer_tokens: int,
               log_dir: Path, progress: Callable[[str], None],
               server_args: Sequence[str] = (), url: str | None = None) -> dict[str, Any]:
    """One configuration (``url``: the running server there, as is, unmarked prompts)."""
    marked = name == "hierarchical_blend"
    rows = []
    started = time.perf_counter()
    with served(model_path, (*CONFIGS.get(name, ()), *server_args),
                log_dir / f"rag-{name}.log", url) as base:
        prewarm_s = 0.0
        if name.startswith("hierarchical_blend"):
            prewarm_s = prewarm_corpus(base, list(rag.documents), timeout_s=1800).seconds
            progress(f"{name}: corpus of {len(rag.documents)} documents pre-warmed in "
                     f"{prewarm_s:.1f}s")
        for n, q in enumerate(rag.questions, 1):
            custom = {"kvext_chunks": [rag.documents[d] for d in q.documents]} if marked \
                else None
            r = stream_generate(base, prompt_text(rag, q), answer_tokens,
                                custom_params=custom)
            ok = is_correct(r.text, q.answer)
            rows.append({"ttft_s": r.ttft_s, "correct": ok, "prompt_tokens": r.prompt_tokens,
                         "cached_tokens": r.cached_tokens, "answer": r.text})
            progress(f"{name}: question {n}/{len(rag.questions)} ttft {r.ttft_s:.2f}s "
                     f"({r.cached_tokens}/{r.prompt_tokens} cached) "
                     f"{'correct' if ok else 'wrong'}")
        counters = kvext_counters(base) if name.startswith("hierarchical") else {}
    ttfts = [r["ttft_s"] for r in rows]
    return {"name": name, "ttft_p50_s": statistics.median(ttfts), "ttft_p90_s": _pct(ttfts, 0.9),
            "accuracy": sum(r["correct"] for r in rows) / len(rows), "prewarm_s": prewarm_s,
            "wall_s": time.perf_counter() - started, "kvext_counters": counters,
            "questions": rows}


CSV_FIELDS = ("config", "question", "ttft_s", "correct", "prompt_tokens", "cached_tokens")


def write_csv(results: dict[str, Any], path: Path) -> Path:
    """One row per request of every configuration."""
    import csv

    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(CSV_FIELDS)
        for c in results["configs"]:
            for n, q in enumerate(c["questions"], 1):
                out.writerow([c["name"], n, f"{q['ttft_s']:.4f}", int(q["correct"]),
                              q["prompt_tokens"], q["cached_tokens"]])
    return path


def run_rag(model_path: Path | None, configs: Sequence[str] = DEFAULT_CONFIGS,
            questions: int = 16,
            documents: int = 24, sentences: int = 36, answer_tokens: int = 16, seed: int = 1,
            log_dir: Path = Path("results"), progress: Callable[[str], None] = print,
            server_args: Sequence[str] = (), url: str | None = None) -> dict[str, Any]:
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        raise ValueError(f"unknown configuration(s) {unknown}; allowed: {', '.join(CONFIGS)}")
    rag = make_rag_set(documents, questions, (4, 8), sentences, seed)
    results: dict[str, Any] = {"model": str(model_path) if url is None else url,
                               "questions": questions,
                               "documents": documents, "configs": []}
    for name in [URL_CONFIG] if url is not None else configs:
        results["configs"].append(run_config(model_path, name, rag, answer_tokens, log_dir,
                                             progress, server_args, url))
    by_name = {c["name"]: c for c in results["configs"]}
    for ours in ("hierarchical_blend", "hierarchical_blend_auto"):
        if ours in by_name and "radix" in by_name:
            results[f"{ours}_p50_speedup_vs_radix"] = (by_name["radix"]["ttft_p50_s"]
                                                       / by_name[ours]["ttft_p50_s"])
        if ours in by_name and "no_cache" in by_name:
            results[f"{ours}_accuracy_delta_vs_no_cache"] = (
                by_name[ours]["accuracy"] - by_name["no_cache"]["accuracy"])
    return results
