"""PROTOTYPE (throwaway): run SGLang's own LlamaForCausalLM layer by layer, without RadixAttention.

Loads SGLang's model in-process on CPU in float32 (no server, no ModelRunner, no KV pool),
prefills a ~300-token prompt manually (per layer: RMSNorm -> qkv_proj -> split -> rotary_emb
-> causal GQA SDPA -> o_proj -> residual -> RMSNorm -> mlp -> residual), takes final-position
logits from the tied embedding, and compares with transformers' float32 model: logits, greedy
token, and the per-layer K (after RoPE) / V against HF's KV cache.

Run: /work/venv/bin/python bench/_proto_manual_forward.py [--model DIR] [--tokens 300]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

T_START = time.perf_counter()

# 1. sgl_kernel shim + SGLANG_USE_CPU_ENGINE=1, before any sglang.srt import.
from sgl_kvext.sglang_plugin.offline_model import load_offline_model  # noqa: E402
from sgl_kvext.sglang_plugin.kernel_fallback import ensure_sgl_kernel  # noqa: E402

KERNEL = ensure_sgl_kernel()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DEFAULT_MODEL = Path.home() / ".cache/sgl_kvext/models/SmolLM2-135M-Instruct-bfloat16"

PARAGRAPH = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a screw press adapted from "
    "wine making. Before that, books in Europe were copied by hand, usually in monasteries, "
    "and a single bible could take a scribe more than a year. Printing spread quickly: by "
    "1500 presses operated in more than two hundred cities, and millions of volumes had been "
    "produced. Scholars argue about how much the press caused the Reformation, the scientific "
    "revolution and the rise of vernacular literature, but few doubt that cheap, identical "
    "copies changed how knowledge travelled. "
)


def gqa_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int,
                         n_kv: int, head_dim: int, scaling: float) -> torch.Tensor:
    """q [T, H*D], k/v [T, KV*D] -> [T, H*D]; causal, kv heads repeated for GQA."""
    t = q.shape[0]
    qh = q.view(t, n_heads, head_dim).transpose(0, 1)               # [H, T, D]
    kh = k.view(t, n_kv, head_dim).transpose(0, 1)                  # [KV, T, D]
    vh = v.view(t, n_kv, head_dim).transpose(0, 1)
    rep = n_heads // n_kv
    kh = kh.repeat_interleave(rep, dim=0)                          # head h uses kv h // rep
    vh = vh.repeat_interleave(rep, dim=0)
    o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scaling)
    return o.transpose(0, 1).reshape(t, n_heads * head_dim)


@torch.no_grad()
def manual_prefill(model, input_ids: torch.Tensor, positions: torch.Tensor):
    """Full prefill through SGLang's modules. Returns (last-token logits, [(K, V)] per layer)
    with K after RoPE, K/V shaped [T, kv_heads, head_dim] (the pool's per-token row layout)."""
    lm = model.model
    h = lm.embed_tokens(input_ids)                                  # [T, hidden]
    kv = []
    for layer in lm.layers[lm.start_layer:lm.end_layer]:
        attn = layer.self_attn
        residual = h
        x = layer.input_layernorm(h)                                # unfused form: returns tensor
        qkv, _bias = attn.qkv_proj(x)                               # (out, bias) tuple
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)                     # same flat shapes back
        o = gqa_causal_attention(q, k, v, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                                 attn.scaling)
        o, _ = attn.o_proj(o)
        h = residual + o
        residual = h
        x = layer.post_attention_layernorm(h)
        h = residual + layer.mlp(x)                                 # forward_batch=None is fine
        kv.append((k.view(-1, attn.num_kv_heads, attn.head_dim),
                   v.reshape(-1, attn.num_kv_heads, attn.head_dim)))
    h = lm.norm(h)
    logits = F.linear(h[-1:], model.lm_head.weight)[0]              # tied: embed_tokens.weight
    return logits, kv


def hf_kv(past, layer: int):
    if hasattr(past, "layers"):                                     # transformers >= 4.56 / 5.x
        return past.layers[layer].keys, past.layers[layer].values
    return past[layer][0], past[layer][1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--tokens", type=int, default=300)
    args = ap.parse_args()
    print(f"sgl_kernel: {KERNEL.source.value} ({KERNEL.reason})")

    t0 = time.perf_counter()
    model = load_offline_model(Path(args.model), "float32")
    t_load = time.perf_counter() - t0
    p = next(model.parameters())
    print(f"sglang load: {t_load:.2f}s (imports before: {t0 - T_START:.2f}s) "
          f"{type(model).__module__}.{type(model).__name__} dtype={p.dtype} device={p.device}")
    print(f"tie_word_embeddings={model.config.tie_word_embeddings} "
          f"lm_head is embed_tokens: {model.lm_head is model.model.embed_tokens}")
    a0 = model.model.layers[0].self_attn
    print(f"attn: heads={a0.num_heads} kv_heads={a0.num_kv_heads} head_dim={a0.head_dim} "
          f"q_size={a0.q_size} kv_size={a0.kv_size} scaling={a0.scaling:.5f} "
          f"rope cache {tuple(a0.rotary_emb.cos_sin_cache.shape)} "
          f"{a0.rotary_emb.cos_sin_cache.dtype} neox={a0.rotary_emb.is_neox_style} "
          f"rope shared across layers: "
          f"{a0.rotary_emb is model.model.layers[1].self_attn.rotary_emb}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    text = PARAGRAPH * (args.tokens // 100 + 2)
    ids = tok(text, add_special_tokens=False)["input_ids"][: args.tokens]
    input_ids = torch.tensor(ids, dtype=torch.long)
    positions = torch.arange(len(ids), dtype=torch.long)
    print(f"prompt tokens: {len(ids)}")

    # Warm-up once (first-call dispatch resolution), then time.
    manual_prefill(model, input_ids[:8], positions[:8])
    t0 = time.perf_counter()
    logits, kv = manual_prefill(model, input_ids, positions)
    t_manual = time.perf_counter() - t0
    print(f"manual prefill: {t_manual * 1000:.1f} ms")
    for i in (0, 1, len(kv) - 1):
        print(f"  layer {i:2d}: K {tuple(kv[i][0].shape)} {kv[i][0].dtype}  "
              f"V {tuple(kv[i][1].shape)} {kv[i][1].dtype}")
    print(f"  ({len(kv)} layers, all K {set(tuple(k.shape) for k, _ in kv)}, "
          f"all V {set(tuple(v.shape) for _, v in kv)})")

    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    t_hf_load = time.perf_counter() - t0
    with torch.no_grad():
        t0 = time.perf_counter()
        out = hf(input_ids[None], use_cache=True)
        t_hf = time.perf_counter() - t0
    ref = out.logits[0, -1].float()
    diff = (logits - ref).abs().max().item()
    print(f"HF load {t_hf_load:.2f}s, HF prefill {t_hf * 1000:.1f} ms "
          f"(attn_implementation={hf.config._attn_implementation})")
    print(f"max |logits diff| (last position) = {diff:.3e}  (logit scale {ref.abs().max():.2f})")
    g_sgl, g_hf = int(logits.argmax()), int(ref.argmax())
    print(f"greedy next token: sglang-manual {g_sgl} {tok.decode([g_sgl])!r} | "
          f"hf {g_hf} {tok.decode([g_hf])!r} -> {'MATCH' if g_sgl == g_hf else 'MISMATCH'}")

    kd = vd = 0.0
    for i, (k, v) in enumerate(kv):
        hk, hv = hf_kv(out.past_key_values, i)                      # [1, KV, T, D]
        kd = max(kd, (k - hk[0].transpose(0, 1)).abs().max().item())
        vd = max(vd, (v - hv[0].transpose(0, 1)).abs().max().item())
    print(f"max |K diff| vs HF cache (post-RoPE) over layers = {kd:.3e}; max |V diff| = {vd:.3e}")
    ok = diff < 1e-3 and g_sgl == g_hf and kd < 1e-3 and vd < 1e-3
    print("RESULT:", "PASS" if ok else "FAIL")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
