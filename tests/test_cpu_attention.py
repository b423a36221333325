"""Prefix-aware extend attention equals SGLang's padded torch_native extend, row for row."""

from __future__ import annotations

import pytest
import torch


def _inputs(prefixes: list[int], new: list[int], heads: int, kv_heads: int, dim: int,
            dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(sum(prefixes) + sum(new))
    seq = [p + n for p, n in zip(prefixes, new, strict=True)]
    slots = 8 + sum(seq)
    req_to_token = torch.zeros((len(seq) + 1, max(seq) + 4), dtype=torch.int32)
    perm = torch.randperm(slots - 1, generator=gen) + 1      # scattered, slot 0 unused
    pos = 0
    for i, s in enumerate(seq):
        req_to_token[i + 1, :s] = perm[pos:pos + s]
        pos += s
    return {
        "query": torch.randn(sum(new), heads, dim, generator=gen).to(dtype),
        "k_cache": torch.randn(slots, kv_heads, dim, generator=gen).to(dtype),
        "v_cache": torch.randn(slots, kv_heads, dim, generator=gen).to(dtype),
        "req_to_token": req_to_token,
        "req_pool_indices": torch.arange(1, len(seq) + 1),
        "seq_lens": torch.tensor(seq), "extend_prefix_lens": torch.tensor(prefixes),
        "extend_seq_lens": torch.tensor(new),
    }


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("prefixes, new", [([0], [7]), ([13], [5]), ([40, 0, 3], [1, 9, 17]),
                                           ([64], [64])])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (9, 3)])
def test_matches_sglang_extend(dtype: torch.dtype, tol: float, prefixes: list[int],
                               new: list[int], heads: int, kv_heads: int) -> None:
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    from sgl_kvext.integration.cpu_attention import PrefixAwareTorchNativeBackend

    args = _inputs(prefixes, new, heads, kv_heads, 16, dtype)
    outs = []
    for cls in (TorchNativeAttnBackend, PrefixAwareTorchNativeBackend):
        backend = object.__new__(cls)       # the extend math reads no backend state
        out = torch.empty_like(args["query"])
        cls._run_sdpa_forward_extend(
            backend, args["query"], out, args["k_cache"], args["v_cache"],
            args["req_to_token"], args["req_pool_indices"], args["seq_lens"],
            args["extend_prefix_lens"], args["extend_seq_lens"], None, scaling=0.25,
            enable_gqa=heads != kv_heads, causal=True)
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], atol=tol, rtol=tol)
