"""CacheBlend quality and speed: blended prefill at several recompute ratios vs full prefill.

Runs in-process on SGLang's own model (loaded once, CPU). Each document's KV is computed alone
once and put into a host-memory tier under its fragment key (not timed). For every question the
prompt's KV is produced by a full prefill and, per ratio, by fetching the documents' KV from the
tier and a blended prefill; ``ttft_s`` is that time up to the first token's logits (no HTTP, no
scheduling). One untimed full prefill warms the allocator first. Answers are decoded greedily
from each KV and scored against the gold value.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from sgl_kvext_bench.rag_set import RagQuestion, RagSet, is_correct, make_rag_set

RATIOS = (0.0, 0.05, 0.15, 0.3, 1.0)
HEAD = "<|im_start|>system\nAnswer the question from the documents.<|im_end|>\n<|im_start|>user\n"


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(p || q) of the softmax distributions."""
    p = torch.log_softmax(p_logits.double(), -1)
    q = torch.log_softmax(q_logits.double(), -1)
    return float((p.exp() * (p - q)).sum())


def run_blend(model_path: Path, ratios: Sequence[float] = RATIOS, questions: int = 12,
              documents: int = 24, sentences: int = 36, answer_tokens: int = 32,
              dtype: str = "float32", seed: int = 0, chunking: str = "explicit",
              min_tokens: int = 16,
              progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Full vs blended prefill per ratio (see the module doc).

    ``chunking`` ``explicit`` reuses each document whole (a request marking its chunks);
    ``auto`` reuses the content-defined fragments (``min_tokens``) lying inside documents,
    each computed on its own the first time a prompt holds it (not timed), as a server
    registers them."""
    from transformers import AutoConfig, AutoTokenizer

    from sgl_kvext.blend import LlamaLayerOps, ReusedChunk, blended_prefill, full_prefill
    from sgl_kvext.blend.decode import greedy_continue
    from sgl_kvext.blend.prefill import compute_chunk_kv
    from sgl_kvext.chunking import fragments
    from sgl_kvext.fragment_store import FragmentStore, KVLayout
    from sgl_kvext.integration.offline_model import load_offline_model
    from sgl_kvext.keys import ModelIdentity
    from sgl_kvext.tiers.chain import TierChain
    from sgl_kvext.tiers.host import HostTier
    from sgl_kvext_kernels import RopeConfig

    rag: RagSet = make_rag_set(documents, questions, (4, 8), sentences, seed)
    tok = AutoTokenizer.from_pretrained(model_path)
    ops = LlamaLayerOps(load_offline_model(model_path, dtype))
    rope = RopeConfig.from_hf_config(AutoConfig.from_pretrained(model_path))
    stop_tokens: list[Any] = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    stop = frozenset(int(t) for t in stop_tokens if isinstance(t, int))

    def enc(text: str) -> torch.Tensor:
        return torch.tensor(tok(text, add_special_tokens=False).input_ids)

    doc_ids = [enc(d) for d in rag.documents]
    layout = KVLayout(ops.num_layers, ops.kv_heads, ops.head_dim, ops.dtype)
    token_bytes = 2 * ops.num_layers * ops.kv_heads * ops.head_dim * ops.dtype.itemsize
    host = HostTier(sum(len(d) for d in doc_ids) * token_bytes * 3, block_bytes=1 << 20)
    identity = ModelIdentity(str(model_path), "bench", dtype, 1, f"mha:layers={ops.num_layers},"
                             f"kv_heads={ops.kv_heads},head_dim={ops.head_dim}")
    store = FragmentStore(TierChain([host]), identity, layout)
    started = time.perf_counter()
    for ids in doc_ids:
        store.put("", compute_chunk_kv(ops, ids))
    progress(f"chunk KV for {len(doc_ids)} documents: {time.perf_counter() - started:.1f}s")
    head = enc(HEAD)

    def prompt(q: RagQuestion) -> tuple[torch.Tensor, list[int]]:
        parts, starts, at = [head], [], len(head)
        for d in q.documents:
            starts.append(at)
            parts.append(doc_ids[d])
            at += len(doc_ids[d])
        parts.append(enc(f"Question: {q.question}<|im_end|>\n<|im_start|>assistant\n{q.stem}"))
        return torch.cat(parts), starts

    def spans_of(q: RagQuestion, ids: torch.Tensor, starts: list[int]) -> list[tuple[int, int]]:
        docs = [(at, at + len(doc_ids[d])) for at, d in zip(starts, q.documents, strict=True)]
        if chunking == "explicit":
            return docs
        inside = [(f.start, f.end) for f in fragments(ids.numpy(), min_tokens)
                  if any(a <= f.start and f.end <= b for a, b in docs)]
        parts = [ids[a:b] for a, b in inside]
        for part, held in zip(parts, store.exists("", parts), strict=True):
            if not held:                      # registered once, as a server would
                store.put("", compute_chunk_kv(ops, part))
        return inside

    def fetch(ids: torch.Tensor, spans: list[tuple[int, int]]) -> list[ReusedChunk]:
        found = store.get("", [ids[a:b] for a, b in spans])
        if len(found) != len(spans):
            raise RuntimeError("the host tier lost a chunk's KV; it is sized to hold all")
        return [ReusedChunk(a, found[i]) for i, (a, _) in enumerate(spans)]

    full_prefill(ops, prompt(rag.questions[0])[0])      # warm-up, not measured

    rows: dict[float, list[dict[str, Any]]] = {r: [] for r in ratios}
    full_rows: list[dict[str, Any]] = []
    for n, q in enumerate(rag.questions, 1):
        ids, starts = prompt(q)
        spans = spans_of(q, ids, starts)
        t0 = time.perf_counter()
        full = full_prefill(ops, ids)
        full_ttft = time.perf_counter() - t0
        full_tokens = greedy_continue(ops, full, len(ids), answer_tokens, stop)
        full_ok = is_correct(tok.decode(full_tokens), q.answer)
        full_rows.append({"ttft_s": full_ttft, "correct": full_ok, "prompt_tokens": len(ids)})
        for ratio in ratios:
            t0 = time.perf_counter()
            blended = blended_prefill(ops, ids, fetch(ids, spans), rope, ratio=ratio)
            ttft = time.perf_counter() - t0
            tokens = greedy_continue(ops, blended, len(ids), answer_tokens, stop)
            same = sum(a == b for a, b in zip(tokens, full_tokens, strict=False))
            rows[ratio].append({
                "ttft_s": ttft, "correct": is_correct(tok.decode(tokens), q.answer),
                "agreement_32": same / max(len(full_tokens), 1),
                "kl_first_token": _kl(full.last_logits, blended.last_logits),
                "recomputed_tokens": blended.recomputed_tokens,
                "reused_tokens": blended.reused_tokens})
        progress(f"question {n}/{len(rag.questions)}: {len(ids)} tokens, full "
                 f"{full_ttft:.2f}s, " + ", ".join(
                     f"r={r}: {rows[r][-1]['ttft_s']:.2f}s" for r in ratios))
    full_ttft_p50 = statistics.median(r["ttft_s"] for r in full_rows)
    full_acc = sum(r["correct"] for r in full_rows) / len(full_rows)
    entries = []
    for ratio in ratios:
        rs = rows[ratio]
        ttft = statistics.median(r["ttft_s"] for r in rs)
        entries.append({
            "ratio": ratio, "ttft_s": ttft, "full_prefill_ttft_s": full_ttft_p50,
            "speedup": full_ttft_p50 / ttft,
            "accuracy": sum(r["correct"] for r in rs) / len(rs),
            "full_prefill_accuracy": full_acc,
            "agreement_32": statistics.mean(r["agreement_32"] for r in rs),
            "kl_first_token": statistics.mean(r["kl_first_token"] for r in rs),
            "reused_tokens": statistics.mean(r["reused_tokens"] for r in rs),
            "questions": rs})
    tokens = [r["prompt_tokens"] for r in full_rows]
    return {"model": str(model_path), "dtype": dtype, "questions": len(full_rows),
            "chunking": chunking, "min_tokens": min_tokens,
            "prompt_tokens_min": min(tokens), "prompt_tokens_max": max(tokens),
            "accuracy_stderr": math.sqrt(max(full_acc * (1 - full_acc), 1e-9) / len(full_rows)),
            "full_prefill": full_rows, "ratios": entries}
