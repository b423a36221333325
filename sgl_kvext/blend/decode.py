"""Greedy decoding on top of a prefill's KV, through the model's own layers.

Used by the blend benchmark to compare continuations after a full and a blended prefill; the
server decodes with SGLang itself.
"""

from __future__ import annotations

import torch

from sgl_kvext.blend.layer_ops import LayerOps
from sgl_kvext.blend.prefill import PrefillResult
from sgl_kvext_kernels import subset_attention


@torch.no_grad()
def greedy_continue(ops: LayerOps, prefill: PrefillResult, next_position: int,
                    max_new_tokens: int, stop_ids: frozenset[int] = frozenset()) -> list[int]:
    """Greedy tokens after ``prefill`` (KV [L, T, H, D], last logits), at most
    ``max_new_tokens``, stopping after a token in ``stop_ids``. The span's positions are
    assumed to end at ``next_position - 1``; new tokens take the following positions."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    t = prefill.k.shape[1]
    dev = prefill.k.device
    kv_pos = torch.arange(next_position - t, next_position, device=dev)
    ks = [prefill.k[layer] for layer in range(ops.num_layers)]
    vs = [prefill.v[layer] for layer in range(ops.num_layers)]
    token = int(prefill.last_logits.argmax())
    out = [token]
    for step in range(max_new_tokens - 1):
        if token in stop_ids:
            break
        pos = torch.tensor([next_position + step], device=dev)
        kv_pos = torch.cat([kv_pos, pos])
        h = ops.embed(torch.tensor([token], device=dev))
        for layer in range(ops.num_layers):
            q, k, v = ops.qkv(layer, h, pos)
            ks[layer] = torch.cat([ks[layer], k])
            vs[layer] = torch.cat([vs[layer], v])
            o = subset_attention(q, pos, ks[layer], vs[layer], kv_pos, scale=ops.scale,
                                 kv_sorted=True)   # positions ascend
            h = ops.finish(layer, h, o)
        token = int(ops.logits(h)[0].argmax())
        out.append(token)
    return out
