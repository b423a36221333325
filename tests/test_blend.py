"""Blended prefill on SGLang's own SmolLM2 layers (loaded in a fresh process, float32).

At ratio 1 the blend recomputes everything and must equal a full prefill; at ratio 0 it keeps
the chunks' stand-alone KV and must differ; the full prefill through the model's modules must
pick the same next token as transformers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from helpers import run_python

pytestmark = pytest.mark.e2e

SCRIPT = r'''
import json, sys
import torch
from transformers import AutoConfig, AutoTokenizer
from sgl_kvext.sglang_plugin.offline_model import load_offline_model
from sgl_kvext.sglang_plugin.model_ops import LlamaLayerOps
from sgl_kvext.blend import (BlendSettings, PrefixKV, ReusedChunk,
                             blended_prefill, compute_chunk_kv, full_prefill)
from sgl_kvext_kernels import RopeConfig

path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
ops = LlamaLayerOps(load_offline_model(path, "float32"))
rope = RopeConfig.from_hf_config(AutoConfig.from_pretrained(path))
enc = lambda s: torch.tensor(tok(s, add_special_tokens=False).input_ids)
head = enc("Answer from the notes below.\n")
a = enc("Note one: the lighthouse on Kell island was painted green in 1911 by the harbour board.\n")
b = enc("Note two: the ferry to Kell leaves at seven and returns at noon, except on Sundays.\n")
tail = enc("Question: what colour was the lighthouse painted?\nAnswer:")
ids = torch.cat([head, b, a, tail])
sa, sb = len(head) + len(b), len(head)
chunks = [ReusedChunk(sa, compute_chunk_kv(ops, a)), ReusedChunk(sb, compute_chunk_kv(ops, b))]
out = {"tokens": len(ids), "reused": len(a) + len(b), "outside": len(head) + len(tail)}
for offset in (0, 7):
    pos = torch.arange(len(ids)) + offset
    full = full_prefill(ops, ids, pos)
    for ratio in (0.0, 0.15, 1.0):
        r = blended_prefill(ops, ids, chunks, rope, positions=pos,
                            settings=BlendSettings(ratio))
        out[f"{offset}/{ratio}"] = {
            "logit_diff": float((r.last_logits - full.last_logits).abs().max()),
            "k_diff": float((r.k - full.k).abs().max()),
            "v_diff": float((r.v - full.v).abs().max()),
            "argmax_equal": int(r.last_logits.argmax()) == int(full.last_logits.argmax()),
            "recomputed": r.recomputed_tokens, "reused": r.reused_tokens}
whole = full_prefill(ops, ids)
out["full_next_token"] = int(whole.last_logits.argmax())
# The head as an already computed prefix: the span after it attends to its KV.
p = out["head"] = len(head)
prefix = PrefixKV(whole.k[:, :p], whole.v[:, :p])
span_chunks = [ReusedChunk(c.start - p, c.kv) for c in chunks]
for name, r in (("prefix/full", full_prefill(ops, ids[p:], prefix=prefix)),
                ("prefix/1.0", blended_prefill(ops, ids[p:], span_chunks, rope, prefix=prefix,
                                               settings=BlendSettings(1.0))),
                ("prefix/0.15", blended_prefill(ops, ids[p:], span_chunks, rope, prefix=prefix,
                                                settings=BlendSettings(0.15)))):
    out[name] = {"logit_diff": float((r.last_logits - whole.last_logits).abs().max()),
                 "k_diff": float((r.k - whole.k[:, p:]).abs().max()),
                 "v_diff": float((r.v - whole.v[:, p:]).abs().max()),
                 "tokens": int(r.k.shape[1]), "recomputed": r.recomputed_tokens}
try:
    full_prefill(ops, ids[p:], positions=torch.arange(len(ids) - p), prefix=prefix)
except ValueError as exc:
    out["overlap_error"] = str(exc)
# A chunk's tail (its head in a cached prefix) re-rotates from where it sat in the chunk.
from sgl_kvext.blend.prefill import _place_chunks
pos, n = torch.arange(len(ids)), len(a)
wk, wv, _, _ = _place_chunks(ops, ids, pos + 3, [chunks[0]], rope)
pk, pv, pr, _ = _place_chunks(ops, ids, pos + 3, [ReusedChunk(sa + 5, chunks[0].kv.part(5, n))],
                           rope)
out["part"] = {"k_diff": float((wk[:, sa + 5:sa + n] - pk[:, sa + 5:sa + n]).abs().max()),
               "v_diff": float((wv[:, sa + 5:sa + n] - pv[:, sa + 5:sa + n]).abs().max()),
               "reused": int(pr.sum()), "expected": n - 5}
# A chunk computed after its lead token: that token's context, then dropped, K back at 0..n-1.
led = compute_chunk_kv(ops, a[1:], a[:1], rope)
from sgl_kvext_kernels import rerotate_k
m = len(a) - 1
back = rerotate_k(led.k.transpose(0, 1).reshape(m, -1, ops.head_dim), torch.arange(m),
                  torch.arange(1, m + 1), rope).view(m, ops.num_layers, ops.kv_heads,
                                                     ops.head_dim).transpose(0, 1)
alone = full_prefill(ops, a)
out["lead"] = {"k_diff": float((back - alone.k[:, 1:]).abs().max()),
               "v_diff": float((led.v - alone.v[:, 1:]).abs().max()),
               "differs_from_none": float((compute_chunk_kv(ops, a[1:]).v - led.v).abs().max()),
               "tokens": len(led), "expected": m, "position": led.position}
try:
    compute_chunk_kv(ops, a[1:], a[:1])
except ValueError as exc:
    out["lead_error"] = str(exc)
out["ids"] = ids.tolist()
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def blend_run(model_path: Path) -> dict:  # type: ignore[type-arg]
    proc = run_python(SCRIPT.replace("sys.argv[1]", repr(str(model_path))), timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])  # type: ignore[no-any-return]


@pytest.mark.parametrize("offset", [0, 7])
def test_ratio_one_equals_full_prefill(blend_run: dict, offset: int) -> None:  # type: ignore[type-arg]
    r = blend_run[f"{offset}/1.0"]
    assert r["recomputed"] == blend_run["tokens"]
    assert r["argmax_equal"]
    assert r["logit_diff"] < 1e-3 and r["k_diff"] < 1e-3 and r["v_diff"] < 1e-3, r


@pytest.mark.parametrize("offset", [0, 7])
def test_ratio_zero_reuses_the_stand_alone_kv(blend_run: dict, offset: int) -> None:  # type: ignore[type-arg]
    r = blend_run[f"{offset}/0.0"]
    # Only the tokens outside the chunks, the check-layer minimum and the last token run on.
    assert r["reused"] == blend_run["reused"]
    assert r["recomputed"] <= blend_run["outside"] + 1
    assert r["k_diff"] > 1e-2          # the chunks' KV lacks the cross-chunk attention


def test_partial_ratio_recomputes_the_selected_share(blend_run: dict) -> None:  # type: ignore[type-arg]
    r = blend_run["0/0.15"]
    selected = r["recomputed"] - blend_run["outside"]
    assert 0 < selected <= -(-0.15 * blend_run["reused"] // 1) + 1


@pytest.mark.parametrize("name", ["prefix/full", "prefix/1.0"])
def test_span_after_a_computed_prefix_equals_the_whole_prefill(
        blend_run: dict, name: str) -> None:  # type: ignore[type-arg]
    r = blend_run[name]
    assert r["tokens"] == blend_run["tokens"] - blend_run["head"]
    assert r["logit_diff"] < 1e-3 and r["k_diff"] < 1e-3 and r["v_diff"] < 1e-3, r


def test_blend_after_a_prefix_recomputes_a_share_and_refuses_overlap(
        blend_run: dict) -> None:  # type: ignore[type-arg]
    r = blend_run["prefix/0.15"]
    assert r["recomputed"] < r["tokens"] and r["k_diff"] > 0
    assert "inside the" in blend_run["overlap_error"]


def test_a_chunk_part_is_placed_as_the_whole_chunk_would_be(
        blend_run: dict) -> None:  # type: ignore[type-arg]
    r = blend_run["part"]
    assert r["reused"] == r["expected"]
    assert r["k_diff"] < 1e-5 and r["v_diff"] == 0, r


def test_a_chunk_after_its_lead_token_is_that_tokens_context_then_dropped(
        blend_run: dict) -> None:  # type: ignore[type-arg]
    r = blend_run["lead"]
    assert r["tokens"] == r["expected"] and r["position"] == 0
    assert r["k_diff"] < 1e-4 and r["v_diff"] < 1e-5, r     # the chunk as computed after it
    assert r["differs_from_none"] > 1e-2                     # not the chunk computed alone
    assert "RoPE" in blend_run["lead_error"]


def test_full_prefill_matches_transformers(
        blend_run: dict, model_path: Path,  # type: ignore[type-arg]
        hf_greedy: Callable[[Sequence[str], int], list[list[int]]]) -> None:
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(model_path).decode(blend_run["ids"])
    assert hf_greedy([text], 1)[0][0] == blend_run["full_next_token"]
