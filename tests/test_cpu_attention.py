"""``kvext_cpu`` attention equals SGLang's ``torch_native``, row for row, on SGLang's paged pool.

The cases are the extend shapes a server produces: cold prefill (nothing cached), a fully cached
prompt (one new token over the cached rest), a partly cached prefix, the later chunks of a chunked
prefill (the earlier chunks are a prefix), mixed batches of all of these, and decode batches of
requests with different lengths; each with scattered and with contiguous pool slots (the backend
reads contiguous slots as a view).
"""

from __future__ import annotations

import pytest
import torch

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _inputs(prefixes: list[int], new: list[int], heads: int, kv_heads: int, dim: int,
            dtype: torch.dtype, contiguous: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(sum(prefixes) + 7 * sum(new) + contiguous)
    seq = [p + n for p, n in zip(prefixes, new, strict=True)]
    slots = 8 + sum(seq)
    req_to_token = torch.zeros((len(seq) + 1, max(seq) + 4), dtype=torch.int32)
    order = torch.arange(1, slots) if contiguous else torch.randperm(slots - 1, generator=gen) + 1
    pos = 0
    for i, s in enumerate(seq):
        req_to_token[i + 1, :s] = order[pos:pos + s]
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


def _backends() -> tuple[type, type]:
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    from sgl_kvext.sglang_plugin.cpu_attention import KVExtCPUAttnBackend

    return TorchNativeAttnBackend, KVExtCPUAttnBackend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case, prefixes, new", [
    ("cold", [0], [37]),
    ("fully cached", [150], [1]),
    ("partly cached", [13], [5]),
    ("chunked prefill, later chunk", [128], [64]),
    ("mixed batch", [40, 0, 3, 99], [1, 9, 17, 1]),
    ("query block edge", [64], [130]),
])
@pytest.mark.parametrize("contiguous", [False, True])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (9, 3)])
def test_extend_matches_torch_native(dtype: torch.dtype, case: str, prefixes: list[int],
                                     new: list[int], contiguous: bool, heads: int,
                                     kv_heads: int) -> None:
    args = _inputs(prefixes, new, heads, kv_heads, 16, dtype, contiguous)
    outs = []
    for cls in _backends():
        backend = object.__new__(cls)       # the attention math reads no backend state
        out = torch.full_like(args["query"], float("nan"))
        cls._run_sdpa_forward_extend(
            backend, args["query"], out, args["k_cache"], args["v_cache"],
            args["req_to_token"], args["req_pool_indices"], args["seq_lens"],
            args["extend_prefix_lens"], args["extend_seq_lens"], None, scaling=0.25,
            enable_gqa=heads != kv_heads, causal=True)
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[1], [300], [5, 77, 1, 260]])
@pytest.mark.parametrize("contiguous", [False, True])
def test_decode_matches_torch_native(dtype: torch.dtype, lengths: list[int],
                                     contiguous: bool) -> None:
    prefixes = [n - 1 for n in lengths]       # decode: one new token after the rest
    args = _inputs(prefixes, [1] * len(lengths), 9, 3, 16, dtype, contiguous)
    outs = []
    for cls in _backends():
        backend = object.__new__(cls)
        out = torch.full_like(args["query"], float("nan"))
        cls._run_sdpa_forward_decode(
            backend, args["query"], out, args["k_cache"], args["v_cache"],
            args["req_to_token"], args["req_pool_indices"], args["seq_lens"], None,
            scaling=0.25, enable_gqa=True, causal=False)
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_contiguous_slots_are_read_without_a_copy() -> None:
    from sgl_kvext.sglang_plugin.cpu_attention import _rows

    cache = torch.randn(50, 3, 8)
    run = _rows(cache, torch.arange(10, 30, dtype=torch.int32))
    assert run.data_ptr() == cache[10].data_ptr() and run.shape == (20, 3, 8)
    shuffled = torch.tensor([12, 11, 13], dtype=torch.int32)   # same span, not ascending
    torch.testing.assert_close(_rows(cache, shuffled), cache[[12, 11, 13]])
    gap = torch.tensor([3, 4, 6], dtype=torch.int32)
    torch.testing.assert_close(_rows(cache, gap), cache[[3, 4, 6]])


def test_registered_as_an_attention_backend_choice() -> None:
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from sgl_kvext.sglang_plugin import cpu_attention

    cpu_attention.register()
    cpu_attention.register()                  # idempotent: plugins load once per process
    assert ATTENTION_BACKEND_CHOICES.count("kvext_cpu") == 1
    assert ATTENTION_BACKENDS["kvext_cpu"] is cpu_attention.KVExtCPUAttnBackend


def test_picking_kvext_cpu_turns_graph_capture_off() -> None:
    from argparse import Namespace

    from sgl_kvext.sglang_plugin.cpu_attention import disable_graphs_for

    args = Namespace(attention_backend="kvext_cpu", disable_cuda_graph=False)
    assert disable_graphs_for(args) and args.disable_cuda_graph
    other = Namespace(attention_backend="triton", decode_attention_backend=None,
                      disable_cuda_graph=False)
    assert not disable_graphs_for(other) and not other.disable_cuda_graph
    split = Namespace(attention_backend=None, decode_attention_backend="kvext_cpu",
                      disable_cuda_graph=False)
    assert disable_graphs_for(split) and split.disable_cuda_graph
