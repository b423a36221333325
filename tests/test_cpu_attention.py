"""``kvext_cpu`` attention equals SGLang's ``torch_native``, row for row, on SGLang's paged pool.

The cases are the extend shapes a server produces: cold prefill (nothing cached), a fully cached
prompt (one new token over the cached rest), a partly cached prefix, the later chunks of a chunked
prefill (the earlier chunks are a prefix), mixed batches of all of these, and decode batches of
requests with different lengths; each with contiguous, scattered and run-by-run pool slots (the
backend reads keys whose slots are one run as a view, gathers the others). Where the slots are
does not change a single bit of the result.
"""

from __future__ import annotations

import pytest
import torch

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _order(layout: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """Pool slots 1..n in the order requests get them: one run, scattered, or runs of 23."""
    if layout == "contiguous":
        return torch.arange(1, n + 1)
    if layout == "scattered":
        return torch.randperm(n, generator=gen) + 1
    chunks = torch.arange(1, n + 1).split(23)
    return torch.cat([chunks[i] for i in torch.randperm(len(chunks), generator=gen).tolist()])


def _inputs(prefixes: list[int], new: list[int], heads: int, kv_heads: int, dim: int,
            dtype: torch.dtype, layout: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(sum(prefixes) + 7 * sum(new) + len(layout))
    seq = [p + n for p, n in zip(prefixes, new, strict=True)]
    slots = 8 + sum(seq)
    req_to_token = torch.zeros((len(seq) + 1, max(seq) + 4), dtype=torch.int32)
    order = _order(layout, slots - 1, gen)
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
@pytest.mark.parametrize("layout", ["contiguous", "scattered", "runs"])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (9, 3)])
def test_extend_matches_torch_native(dtype: torch.dtype, case: str, prefixes: list[int],
                                     new: list[int], layout: str, heads: int,
                                     kv_heads: int) -> None:
    args = _inputs(prefixes, new, heads, kv_heads, 16, dtype, layout)
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
@pytest.mark.parametrize("layout", ["contiguous", "scattered", "runs"])
def test_decode_matches_torch_native(dtype: torch.dtype, lengths: list[int],
                                     layout: str) -> None:
    prefixes = [n - 1 for n in lengths]       # decode: one new token after the rest
    args = _inputs(prefixes, [1] * len(lengths), 9, 3, 16, dtype, layout)
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


@pytest.mark.parametrize("n_new", [1, 4])
def test_the_keys_before_the_queries_own_are_one_piece_a_view_when_one_run(n_new: int) -> None:
    from sgl_kvext.sglang_plugin.cpu_attention import _layout

    own = torch.arange(200, 200 + n_new)
    run = _layout(torch.cat([torch.arange(100, 125), own]), n_new)
    pieces = _layout(torch.cat([torch.arange(100, 125), torch.arange(5, 9), own]), n_new)
    if n_new > 1:
        assert run.prefix == (100, 25) and run.own is not None and run.own.tolist() == [
            200, 201, 202, 203]
        assert isinstance(pieces.prefix, torch.Tensor)
        assert pieces.prefix.tolist() == [*range(100, 125), 5, 6, 7, 8]
    else:                                    # one query sees every key: one piece, gathered
        assert run.own is None and isinstance(run.prefix, torch.Tensor)
        assert run.prefix.tolist() == [*range(100, 125), 200]
    assert _layout(own, n_new).prefix == ((200, 1) if n_new == 1 else None)   # cold prefill


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_new", [1, 7])
def test_where_the_slots_are_changes_no_bit(dtype: torch.dtype, n_new: int) -> None:
    """A tier hit (slots in pieces) computes exactly what a device hit (one run) does: what
    attention over the gathered KV computes."""
    from sgl_kvext.sglang_plugin import cpu_attention
    from sgl_kvext_kernels.reference.subset_attention import suffix_attention

    kv_len, gen = 120, torch.Generator().manual_seed(n_new)
    keys = torch.randn(kv_len, 3, 16, generator=gen).to(dtype)
    values = torch.randn(kv_len, 3, 16, generator=gen).to(dtype)
    q = torch.randn(n_new, 9, 16, generator=gen).to(dtype)
    prefix = kv_len - n_new if n_new > 1 else kv_len
    want = suffix_attention(q, [(keys[:prefix], values[:prefix])],
                            (keys[prefix:], values[prefix:]) if n_new > 1 else None, 0.25,
                            torch.empty_like(q))
    for layout in ("contiguous", "scattered", "runs"):
        slots = _order(layout, kv_len, gen)
        k_cache, v_cache = torch.zeros(kv_len + 1, 3, 16, dtype=dtype), torch.zeros(
            kv_len + 1, 3, 16, dtype=dtype)
        k_cache[slots], v_cache[slots] = keys, values
        out = torch.empty_like(q)
        cpu_attention.KVExtCPUAttnBackend._attend(q, out, k_cache, v_cache,
                                                  cpu_attention._layout(slots, n_new), 0.25)
        assert torch.equal(out, want), layout


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
