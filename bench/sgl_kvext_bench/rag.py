"""RAG serving benchmark: the same questions over shuffled documents, four server set-ups.

Every prompt is a system line, 4-8 documents of the synthetic RAG set in shuffled order, the
question and the answer's stem (``rag_set.py``); answers are greedy and scored against the
gold value. Requests go one at a time and stream, so TTFT has no queueing. Set-ups, one server
each, one after another, in the CPU's fast dtype (``sgl_kvext.harness.server.dtype_flags``):

- ``no_cache``: ``--disable-radix-cache``;
- ``radix``: SGLang's default radix cache (only the shared system line is a prefix);
- ``hierarchical``: ``--enable-hierarchical-kv`` (evicted KV spills to host memory);
- ``hierarchical_blend``: plus ``--kvext-fragment-blend``; the corpus is pre-warmed once
  (``prewarm_corpus``, not timed) and each request marks its documents (``kvext_chunks``);
- ``hierarchical_blend_auto`` (optional): the same without marks, automatic chunks only.

In the blend configurations every question is first asked in exact mode (``kvext_exact``,
untimed: the reference, with its top-20 first-token log-probabilities), then blended (timed,
with the log-probabilities of those 20 tokens); :mod:`sgl_kvext_bench.quality` summarizes
the pairs, and each response's ``meta_info["kvext_blend"]`` report is tabulated.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, NamedTuple

from sgl_kvext.fragments.prewarm_client import prewarm_corpus
from sgl_kvext_bench.client import Endpoint, Timed, kvext_counters, post_json
from sgl_kvext_bench.configs import CONFIGS
from sgl_kvext_bench.quality import Pair, kl_top, summarize
from sgl_kvext_bench.rag_set import RagSet, RagSpec, is_correct, prompt_text
from sgl_kvext_bench.serving import Serving

#: First-token log-probabilities compared between the exact and the blended answer.
TOP_K = 20

DEFAULT_CONFIGS = ("no_cache", "radix", "hierarchical", "hierarchical_blend")

def trace_requests(spec: RagSpec, answer_tokens: int, interval_s: float) -> list[Any]:
    """The questions as replay-trace requests, one every ``interval_s``, each marking its
    documents as chunks."""
    from sgl_kvext_bench.replay import TraceRequest

    rag = spec.build()
    return [TraceRequest(i * interval_s, prompt_text(rag, q), answer_tokens,
                         tuple(rag.documents[d] for d in q.documents))
            for i, q in enumerate(rag.questions)]


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Exact(NamedTuple):
    """The exact-mode answer of a prompt: its text, first token and top-K log-probabilities."""

    text: str
    first_token: int
    top: dict[int, float]


def exact_answer(target: Endpoint, text: str, answer_tokens: int) -> Exact:
    """``text`` answered in exact mode (never blended), with its first token's top-K."""
    out = post_json(target.url, "/generate", {
        "text": text, "return_logprob": True, "top_logprobs_num": TOP_K,
        "sampling_params": {"temperature": 0.0, "max_new_tokens": answer_tokens,
                            "custom_params": {"kvext_exact": True}}})
    meta = out["meta_info"]
    return Exact(out["text"], int(meta["output_token_logprobs"][0][1]),
                 {int(tid): float(lp) for lp, tid, *_ in meta["output_top_logprobs"][0]})


def _first_token_logprobs(r: Timed) -> tuple[int, dict[int, float]]:
    """The blended answer's first token and its log-probabilities of the requested ids."""
    first = r.meta["output_token_logprobs"][0]
    asked = r.meta["output_token_ids_logprobs"][0]
    return int(first[1]), {int(tid): float(lp) for lp, tid, *_ in asked}


def blend_reports(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the blend reports of ``rows`` add up to: outcomes, marked spans, tokens."""
    reports = [r["kvext_blend"] for r in rows if r.get("kvext_blend")]
    if not reports:
        return {}
    outcomes: dict[str, int] = {}
    dropped: dict[str, int] = {}
    for rep in reports:
        outcomes[rep["outcome"]] = outcomes.get(rep["outcome"], 0) + 1
        for *_, reason in rep["marked_dropped"]:
            dropped[reason] = dropped.get(reason, 0) + 1
    total = {k: sum(rep[k] for rep in reports) for k in (
        "marked_used", "marked_partial", "marked_in_prefix", "auto_used", "fragments_missing",
        "reused_tokens", "recomputed_tokens")}
    timed = [rep["seconds"] for rep in reports if rep.get("seconds")]
    steps = {f"{step}_s_mean": statistics.mean(t[step] for t in timed)
             for step in (timed[0] if timed else ())}
    return {"requests": len(reports), "outcomes": outcomes, "marked_dropped": dropped,
            **total, "reused_tokens_mean": total["reused_tokens"] / len(reports),
            "recomputed_tokens_mean": total["recomputed_tokens"] / len(reports), **steps}


def run_config(serving: Serving, name: str, rag: RagSet, answer_tokens: int,
               progress: Callable[[str], None]) -> dict[str, Any]:
    """One configuration (``url``: the running server, as is, unmarked prompts)."""
    marked = name == "hierarchical_blend"
    blend = name.startswith("hierarchical_blend")
    rows: list[dict[str, Any]] = []
    gaps: list[float] = []
    pairs: list[Pair] = []
    started = time.perf_counter()
    with serving.serve("rag", name, CONFIGS.get(name, ())) as target:
        prewarm_s = 0.0
        if blend:
            prewarm_s = prewarm_corpus(target.url, list(rag.documents), timeout_s=1800).seconds
            progress(f"{name}: corpus of {len(rag.documents)} documents pre-warmed in "
                     f"{prewarm_s:.1f}s")
        for n, q in enumerate(rag.questions, 1):
            text = prompt_text(rag, q)
            custom = {"kvext_chunks": [rag.documents[d] for d in q.documents]} if marked \
                else None
            exact = exact_answer(target, text, answer_tokens) if blend else None
            extra = {"return_logprob": True, "token_ids_logprob": list(exact.top)} \
                if exact is not None else None
            r = target.generate(text, answer_tokens, custom_params=custom, extra=extra)
            ok = is_correct(r.text, q.answer)
            gaps += r.itl_s
            row = {"ttft_s": r.ttft_s, "correct": ok, "prompt_tokens": r.prompt_tokens,
                   "cached_tokens": r.cached_tokens, "answer": r.text}
            if exact is not None:
                first, asked = _first_token_logprobs(r)
                pair = Pair(n, is_correct(exact.text, q.answer), ok, kl_top(exact.top, asked),
                            first == exact.first_token)
                pairs.append(pair)
                row |= {"exact_answer": exact.text, "exact_correct": pair.exact_correct,
                        "kl": pair.kl, "top1_agree": pair.top1_agree,
                        "kvext_blend": (r.meta.get("kvext_blend") or [None])[0]}
            rows.append(row)
            progress(f"{name}: question {n}/{len(rag.questions)} ttft {r.ttft_s:.2f}s "
                     f"({r.cached_tokens}/{r.prompt_tokens} cached) "
                     f"{'correct' if ok else 'wrong'}")
        counters = kvext_counters(target.url) if name.startswith("hierarchical") else {}
    ttfts = [r["ttft_s"] for r in rows]
    result = {"name": name, "ttft_p50_s": statistics.median(ttfts),
              "ttft_p90_s": _pct(ttfts, 0.9),
              "itl_p50_s": statistics.median(gaps) if gaps else None,
              "accuracy": sum(r["correct"] for r in rows) / len(rows), "prewarm_s": prewarm_s,
              "wall_s": time.perf_counter() - started, "kvext_counters": counters,
              "questions": rows}
    if pairs:
        result["quality"] = summarize(pairs)
        result["blend_reports"] = blend_reports(rows)
    return result


def run_rag(serving: Serving, spec: RagSpec, configs: Sequence[str] = DEFAULT_CONFIGS,
            answer_tokens: int = 16, progress: Callable[[str], None] = print
            ) -> dict[str, Any]:
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        raise ValueError(f"unknown configuration(s) {unknown}; allowed: {', '.join(CONFIGS)}")
    rag = spec.build()
    results: dict[str, Any] = {"model": serving.url or str(serving.model_path),
                               "questions": spec.questions, "documents": spec.documents,
                               "workload": asdict(spec), "configs": []}
    for name in serving.configs(configs):
        results["configs"].append(run_config(serving, name, rag, answer_tokens, progress))
    by_name = {c["name"]: c for c in results["configs"]}
    for ours in ("hierarchical_blend", "hierarchical_blend_auto"):
        if ours in by_name and "radix" in by_name:
            results[f"{ours}_p50_speedup_vs_radix"] = (by_name["radix"]["ttft_p50_s"]
                                                       / by_name[ours]["ttft_p50_s"])
        if ours in by_name and "no_cache" in by_name:
            results[f"{ours}_accuracy_delta_vs_no_cache"] = (
                by_name[ours]["accuracy"] - by_name["no_cache"]["accuracy"])
    return results
