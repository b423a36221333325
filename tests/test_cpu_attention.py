"""``kvext_cpu`` attention equals SGLang's ``torch_native``, row for row, on SGLang's paged pool.

The cases are the extend shapes a server produces: cold prefill (nothing cached), a fully cached
prompt (one new token over the cached rest), a partly cached prefix, the later chunks of a chunked
prefill (the earlier chunks are a prefix), mixed batches of all of these, and decode batches of
requests with different lengths; each with contiguous, scattered and run-by-run pool slots (the
backend reads long runs as views, in pieces merged by log-sum-exp, and gathers the rest).
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
@pytest.mark.parametrize("view_min", [8, 1024])       # runs of 23 read as views / gathered
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (9, 3)])
def test_extend_matches_torch_native(dtype: torch.dtype, case: str, prefixes: list[int],
                                     new: list[int], layout: str, view_min: int, heads: int,
                                     kv_heads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from sgl_kvext.sglang_plugin import cpu_attention

    monkeypatch.setattr(cpu_attention, "VIEW_MIN_TOKENS", view_min)
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
@pytest.mark.parametrize("view_min", [8, 1024])
def test_decode_matches_torch_native(dtype: torch.dtype, lengths: list[int], layout: str,
                                     view_min: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from sgl_kvext.sglang_plugin import cpu_attention

    monkeypatch.setattr(cpu_attention, "VIEW_MIN_TOKENS", view_min)
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
def test_long_runs_are_views_and_every_key_is_read_once(n_new: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from sgl_kvext.sglang_plugin import cpu_attention

    monkeypatch.setattr(cpu_attention, "VIEW_MIN_TOKENS", 10)
    slots = torch.cat([torch.arange(100, 130), torch.arange(5, 9), torch.arange(60, 72),
                       torch.arange(40, 43), torch.arange(200, 200 + n_new)])
    layout = cpu_attention._layout(slots, n_new)
    assert layout.views == [(100, 30), (60, 12)]               # the runs of 10 or more
    prefix = slots.shape[0] - (n_new if n_new > 1 else 0)
    read = [s for a, m in layout.views for s in range(a, a + m)]
    read += layout.gathered.tolist() if layout.gathered is not None else []
    assert sorted(read) == sorted(slots[:prefix].tolist())     # each prefix key once
    if n_new > 1:                                               # own keys in order
        assert layout.own is not None and layout.own.tolist() == list(range(200, 204))
    else:
        assert layout.own is None                              # the one query sees all


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
