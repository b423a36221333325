"""Blend quality and speed offline: every blend method at several recompute ratios against
the exact (full) prefill of the same prompts.

Runs in-process on SGLang's own model (loaded once, CPU), with the server's conventions: the
prompt is tokenized whole, each document is found in it by its core (``marked_core``: the
server's marked span) and the core's KV is computed the way the server registers it
(``compute_chunk_kv`` after the document's first token), once, into a host-memory tier under
its fragment key (not timed). For every question the exact prefill runs once (its logits and
greedy answer are the reference); then, per method and ratio, the documents' KV is fetched
from the tier and blended; ``ttft_s`` is that time up to the first token's logits (no HTTP,
no scheduling). One untimed prefill warms the allocator first. Quality per (method, ratio)
comes from :mod:`sgl_kvext_bench.quality`.

Methods (:data:`METHODS`) are :class:`~sgl_kvext.blend.BlendSettings` variants (the ratio
comes from ``--ratios``) plus how a chunk's KV is computed alone: ``context`` ``none`` (after
its first token only, as the server does) or ``head`` (after the prompt's system head and its
first token, stored without them, re-rotated like any chunk).
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sgl_kvext_bench.quality import Pair, describe, kl_full, summarize
from sgl_kvext_bench.rag_set import HEAD, RagQuestion, RagSpec, is_correct, prompt_text
from sgl_kvext_bench.reference_cache import Reference, ReferenceCache

RATIOS = (0.0, 0.05, 0.15, 0.3)


class Method(NamedTuple):
    """A named blend method: settings (ratio set per run), chunk context, and the first-token
    entropy (nats) of the blended answer above which the prompt is prefilled again exactly
    (a second pass where the next token is a close call; ``inf``: never)."""

    settings: dict[str, Any]
    context: str = "none"
    fallback_entropy: float = math.inf


METHODS: dict[str, Method] = {
    "cacheblend": Method({}),
    "check2": Method({"check_layer": 2}),
    "check4": Method({"check_layer": 4}),
    "per_chunk": Method({"spread": "chunk"}),
    "sinks4": Method({"sink_tokens": 4}),
    "gradual2": Method({"gradual": 2.0}),
    "query_half": Method({"query_share": 0.5}),
    "check4_query_half": Method({"check_layer": 4, "query_share": 0.5}),
    "check6_query_half": Method({"check_layer": 6, "query_share": 0.5}),
    "check8_query_half": Method({"check_layer": 8, "query_share": 0.5}),
    "attention_spread": Method({"spread": "attention"}),
    "attention_spread_query_half": Method({"spread": "attention", "query_share": 0.5}),
    "query_all": Method({"query_share": 1.0}),
    "head_context": Method({}, "head"),
    "head_query_half": Method({"query_share": 0.5}, "head"),
    "check6_query_half_fallback": Method({"check_layer": 6, "query_share": 0.5},
                                         fallback_entropy=3.0),
}


def run_blend(model_path: Path, spec: RagSpec, methods: Sequence[str] = ("cacheblend",),
              ratios: Sequence[float] = RATIOS, answer_tokens: int = 8,
              dtype: str = "float32", progress: Callable[[str], None] = print,
              reference_dir: Path | None = None) -> dict[str, Any]:
    """Exact vs blended prefill per method and ratio (see the module doc); the exact results
    are read from and kept in ``reference_dir`` (:mod:`sgl_kvext_bench.reference_cache`)."""
    from transformers import AutoConfig, AutoTokenizer

    from sgl_kvext.blend import (
        BlendSettings,
        ReusedChunk,
        blended_prefill,
        compute_chunk_kv,
        first_token_entropy,
        full_prefill,
    )
    from sgl_kvext.blend.decode import greedy_continue
    from sgl_kvext.blend.prefill import ChunkKV, PrefixKV
    from sgl_kvext.fragments.index import locate_chunks
    from sgl_kvext.fragments.store import FragmentStore, KVLayout
    from sgl_kvext.pages.keys import DEFAULT_TENANT, ModelIdentity
    from sgl_kvext.sglang_plugin.model_ops import LlamaLayerOps
    from sgl_kvext.sglang_plugin.offline_model import load_offline_model
    from sgl_kvext.tiers.chain import TierChain
    from sgl_kvext.tiers.host import HostTier
    from sgl_kvext_kernels import RopeConfig

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown}; allowed: {', '.join(METHODS)}")
    rag = spec.build()
    tok = AutoTokenizer.from_pretrained(model_path)
    ops = LlamaLayerOps(load_offline_model(model_path, dtype))
    rope = RopeConfig.from_hf_config(AutoConfig.from_pretrained(model_path))
    stop_tokens: list[Any] = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    stop = frozenset(int(t) for t in stop_tokens if isinstance(t, int)) | frozenset(
        i for t, i in tok.get_vocab().items() if "." in t)      # scoring reads up to a period

    references = ReferenceCache(reference_dir, str(model_path), dtype, answer_tokens, stop)

    def enc(text: str) -> torch.Tensor:
        return torch.tensor(tok(text, add_special_tokens=False).input_ids)

    head = enc(HEAD)
    head_kv = full_prefill(ops, head)
    doc_ids = [enc(d) for d in rag.documents]
    used = sorted({d for q in rag.questions for d in q.documents})     # only these are stored
    layout = KVLayout(ops.num_layers, ops.kv_heads, ops.head_dim, ops.dtype)
    token_bytes = 2 * ops.num_layers * ops.kv_heads * ops.head_dim * ops.dtype.itemsize
    contexts = sorted({METHODS[m].context for m in methods})
    host = HostTier((sum(len(doc_ids[d]) for d in used) * token_bytes + (len(used) << 20))
                    * len(contexts), block_bytes=1 << 20)     # a block of slack per document
    stores = {}
    started = time.perf_counter()
    for context in contexts:
        identity = ModelIdentity(str(model_path), f"bench-{context}", dtype, 1,
                                 f"mha:layers={ops.num_layers},kv_heads={ops.kv_heads},"
                                 f"head_dim={ops.head_dim}")
        stores[context] = store = FragmentStore(TierChain([host]), identity, layout)
        for ids in (doc_ids[d] for d in used):      # the core: without the first and last
            if context == "head":       # computed after the head, stored without it
                r = full_prefill(ops, ids, prefix=PrefixKV(head_kv.k, head_kv.v))
                store.put(DEFAULT_TENANT, ChunkKV(ids[1:-1].clone(), r.k[:, 1:-1],
                                                  r.v[:, 1:-1], position=len(head) + 1))
            else:
                store.put(DEFAULT_TENANT, compute_chunk_kv(ops, ids[1:-1], ids[:1], rope))
    progress(f"chunk KV for {len(used)} documents x {len(contexts)} context(s): "
             f"{time.perf_counter() - started:.1f}s")

    def prompt(q: RagQuestion) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The prompt tokenized whole (as the server does) and its documents' core spans."""
        ids = torch.tensor(tok(prompt_text(rag, q)).input_ids)
        spans = locate_chunks(ids.numpy(), [doc_ids[d].numpy() for d in q.documents])
        if len(spans) != len(q.documents):
            raise RuntimeError(f"question {q.question!r}: a document's core is not in the "
                               "tokenized prompt")
        return ids, spans

    def fetch(context: str, ids: torch.Tensor, spans: list[tuple[int, int]]
              ) -> list[ReusedChunk]:
        found = stores[context].get(DEFAULT_TENANT, [ids[a:b] for a, b in spans])
        if len(found) != len(spans):
            raise RuntimeError("the host tier lost a chunk's KV; it is sized to hold all")
        # The stored KV keeps the position it was computed at (0, or after the head).
        return [ReusedChunk(a, ChunkKV(found[i].token_ids, found[i].k, found[i].v,
                                       len(head) + 1 if context == "head" else 0))
                for i, (a, _) in enumerate(spans)]

    def exact(ids: torch.Tensor) -> Reference:
        t0 = time.perf_counter()
        full = full_prefill(ops, ids)
        ttft = time.perf_counter() - t0
        answer = str(tok.decode(greedy_continue(ops, full, len(ids), answer_tokens, stop)))
        return Reference(full.last_logits, answer, ttft)

    full_prefill(ops, prompt(rag.questions[0])[0])      # warm-up, not measured
    runs = [(m, r) for m in methods for r in ratios]
    pairs: dict[tuple[str, float], list[Pair]] = {run: [] for run in runs}
    ttfts: dict[tuple[str, float], list[float]] = {run: [] for run in runs}
    rows: list[dict[str, Any]] = []
    full_ttfts, lengths, cached = [], [], 0
    for n, q in enumerate(rag.questions):
        ids, spans = prompt(q)
        lengths.append(len(ids))
        full = references.get(ids, exact)
        full_ttfts.append(full.ttft_s)
        cached += full.cached
        exact_answer = full.answer
        exact_ok = is_correct(exact_answer, q.answer)
        for method, ratio in runs:
            how = METHODS[method]
            settings = replace(BlendSettings(), ratio=ratio, **how.settings)
            t0 = time.perf_counter()
            blended = blended_prefill(ops, ids, fetch(how.context, ids, spans), rope,
                                      settings=settings)
            uncertainty = first_token_entropy(blended.last_logits)
            fell_back = uncertainty > how.fallback_entropy
            if fell_back:                       # the second pass: the whole prompt, exactly
                blended = full_prefill(ops, ids)
            ttft = time.perf_counter() - t0
            answer = str(tok.decode(greedy_continue(ops, blended, len(ids), answer_tokens,
                                                    stop)))
            pair = Pair(n + 1, exact_ok, is_correct(answer, q.answer),
                        kl_full(full.last_logits, blended.last_logits),
                        int(full.last_logits.argmax()) == int(blended.last_logits.argmax()))
            pairs[method, ratio].append(pair)
            ttfts[method, ratio].append(ttft)
            rows.append({"method": method, "ratio": ratio, **pair._asdict(), "ttft_s": ttft,
                         "full_ttft_s": full_ttfts[-1], "prompt_tokens": len(ids),
                         "recomputed_tokens": blended.recomputed_tokens,
                         "reused_tokens": blended.reused_tokens,
                         "blend_entropy": uncertainty, "fell_back": fell_back, "gold": q.answer,
                         "exact_answer": exact_answer, "blend_answer": answer})
        last = {run: pairs[run][-1] for run in runs}       # '!': a wrong answer
        progress(f"question {n + 1}/{len(rag.questions)}: {len(ids)} tokens, full "
                 f"{full_ttfts[-1]:.2f}s; KL " + " ".join(
                     f"{m}@{r}={p.kl:.3f}{'' if p.blend_correct else '!'}"
                     for (m, r), p in last.items()))
    full_p50 = statistics.median(full_ttfts)
    entries = []
    for method, ratio in runs:
        summary = summarize(pairs[method, ratio])
        p50 = statistics.median(ttfts[method, ratio])
        entries.append({"method": method, "ratio": ratio, "context": METHODS[method].context,
                        "settings": {**asdict(BlendSettings()), **METHODS[method].settings,
                                     "ratio": ratio},
                        "ttft_p50_s": p50, "speedup": full_p50 / p50, **summary})
        progress(f"{method} @ {ratio}: {describe(summary)}")
    return {"model": str(model_path), "dtype": dtype, "workload": asdict(spec),
            "python": platform.python_version(), "questions": len(rag.questions),
            "answer_tokens": answer_tokens,
            "prompt_tokens_min": min(lengths), "prompt_tokens_max": max(lengths),
            "prompt_tokens_mean": statistics.mean(lengths),
            "full_prefill_ttft_p50_s": full_p50, "references_cached": cached,
            "runs": entries, "rows": rows}
