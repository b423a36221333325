"""CPU attention: TTFT of cold and fully cached prompts, ``torch_native`` vs ``kvext_cpu``.

One server per attention backend, one after the other (two CPU servers at once exhaust this
machine's memory), both with SGLang's default radix cache and the same seeded prompts. For each
prompt length and repeat, a prompt sharing no prefix with any other is timed cold (the whole
prefill; the server's chunked prefill applies, 4,096 tokens by default on CPU), then the
same token ids again: SGLang then reuses all but the last token from its radix tree, so the
second TTFT is the cost of a fully cached prefix. Only the attention backend differs.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sgl_kvext.harness.demo import build_context
from sgl_kvext.harness.server import SGLangServer
from sgl_kvext_bench.client import stream_generate

BACKENDS = ("torch_native", "kvext_cpu")


def prompt_ids(tokenizer: Any, n_tokens: int, index: int) -> list[int]:
    """Exactly ``n_tokens`` token ids: a distinct first token (vocabulary id ``1000 + index``,
    so prompts with different indexes share no prefix) and then a seeded ledger text."""
    records = n_tokens // 12 + 8             # a ledger line is about 20 tokens: enough text
    ids: list[int] = tokenizer(build_context(records, seed=index)[0]).input_ids
    if len(ids) < n_tokens:
        raise ValueError(f"ledger of {records} records has {len(ids)} < {n_tokens} tokens")
    return [1000 + index, *ids[:n_tokens - 1]]


def run_attention(model_path: Path, lengths: Sequence[int], backends: Sequence[str],
                  repeats: int, log_dir: Path, progress: Callable[[str], None] = print,
                  server_args: Sequence[str] = ()) -> dict[str, Any]:
    """Cold and cached TTFT per backend and prompt length; medians over ``repeats`` prompts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = {n: [prompt_ids(tokenizer, n, index=i * repeats + r) for r in range(repeats)]
               for i, n in enumerate(lengths)}
    pool = max(lengths) * 2 + 512
    results: dict[str, Any] = {"lengths": list(lengths), "repeats": repeats, "backends": {}}
    for backend in backends:
        args = ("--attention-backend", backend, "--max-total-tokens", str(pool), *server_args)
        per_length: dict[str, Any] = {}
        with SGLangServer(model_path, args, log_path=log_dir / f"attention-{backend}.log") as srv:
            stream_generate(srv.url, "Hello", 1)        # warm-up
            for n in lengths:
                cold, cached, reused = [], [], []
                for r, ids in enumerate(prompts[n]):
                    first = stream_generate(srv.url, ids, 1)
                    again = stream_generate(srv.url, ids, 1)
                    cold.append(first.ttft_s)
                    cached.append(again.ttft_s)
                    reused.append(again.cached_tokens)
                    progress(f"{backend}: {n} tokens #{r + 1}: cold {first.ttft_s:.3f}s, "
                             f"cached {again.ttft_s:.3f}s ({again.cached_tokens} cached)")
                per_length[str(n)] = {
                    "cold_s": cold, "cached_s": cached, "cached_tokens": reused,
                    "cold_p50_s": statistics.median(cold),
                    "cached_p50_s": statistics.median(cached)}
        results["backends"][backend] = per_length
    results["ratios"] = _ratios(results["backends"], lengths)
    return results


def _ratios(by_backend: dict[str, Any], lengths: Sequence[int]) -> dict[str, Any]:
    """The issue's targets, per length: kvext_cpu cached vs torch_native cached and vs cold."""
    if not all(b in by_backend for b in BACKENDS):
        return {}
    out = {}
    for n in map(str, lengths):
        native, ours = by_backend["torch_native"][n], by_backend["kvext_cpu"][n]
        out[n] = {
            "cached_speedup_vs_torch_native_cached":
                native["cached_p50_s"] / ours["cached_p50_s"],
            "cached_speedup_vs_cold": ours["cold_p50_s"] / ours["cached_p50_s"],
            "cached_speedup_vs_torch_native_cold": native["cold_p50_s"] / ours["cached_p50_s"],
            "cold_time_vs_torch_native_cold": ours["cold_p50_s"] / native["cold_p50_s"]}
    return out
