"""The torch stand-ins for sgl_kernel's CPU ops, against plain torch references and through
SGLang's own callers (MHATokenToKVPool.move_kv_cache, assign_req_to_token_pool_func)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_python
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_kvext.sglang_plugin.kernel_fallback import SHIM_DIR
from sgl_kvext.sglang_plugin.sgl_kernel_ops import (
    NOT_PROVIDED,
    assign_req_to_token_pool_cpu,
    copy_all_layer_kv_cache_cpu,
    not_provided,
    rmsnorm,
)


def _assign_reference(rows: list[int], starts: list[int], ends: list[int],
                      locs: list[int], table: torch.Tensor) -> torch.Tensor:
    table = table.clone()
    pos = 0
    for row, start, end in zip(rows, starts, ends, strict=True):
        for col in range(start, end):
            table[row, col] = locs[pos]
            pos += 1
    return table


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_assign_req_to_token_pool_matches_reference(data: st.DataObject) -> None:
    num_reqs, pool_len = 6, 24
    batch = data.draw(st.integers(1, num_reqs))
    rows = data.draw(st.lists(st.integers(0, num_reqs - 1), min_size=batch, max_size=batch,
                              unique=True))
    spans = [sorted(data.draw(st.tuples(st.integers(0, pool_len), st.integers(0, pool_len))))
             for _ in rows]
    starts, ends = [s for s, _ in spans], [e for _, e in spans]
    locs = data.draw(st.lists(st.integers(0, 10_000), min_size=sum(e - s for s, e in spans),
                              max_size=sum(e - s for s, e in spans)))
    table = torch.full((num_reqs, pool_len), -7, dtype=torch.int32)
    expected = _assign_reference(rows, starts, ends, locs, table)
    assign_req_to_token_pool_cpu(torch.tensor(rows), table, torch.tensor(starts),
                                 torch.tensor(ends), torch.tensor(locs, dtype=torch.int64),
                                 pool_len)
    assert torch.equal(table, expected)


def test_assign_req_to_token_pool_rejects_short_inputs() -> None:
    table = torch.zeros((2, 8), dtype=torch.int32)
    with pytest.raises(ValueError, match="slots"):
        assign_req_to_token_pool_cpu(torch.tensor([0]), table, torch.tensor([0]),
                                     torch.tensor([5]), torch.arange(3), 8)
    with pytest.raises(ValueError, match="pool_len"):
        assign_req_to_token_pool_cpu(torch.tensor([0]), table, torch.tensor([0]),
                                     torch.tensor([1]), torch.arange(1), 9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.uint8])
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("row_shape", [(1, 4), (3, 64)])
def test_copy_all_layer_kv_cache_matches_reference(dtype: torch.dtype, layers: int,
                                                   row_shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(layers)
    rows = 50
    buffers = [(torch.randn((rows, *row_shape), generator=gen) * 50).to(dtype)
               for _ in range(2 * layers)]
    expected = [b.clone() for b in buffers]
    src = torch.tensor([1, 4, 7, 8, 30])
    tgt = torch.tensor([40, 2, 49, 10, 11])
    for b in expected:
        b[tgt] = b[src].clone()
    ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.uint64)
    strides = torch.tensor([b[0].numel() * b.element_size() for b in buffers])
    copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
    for got, want in zip(buffers, expected, strict=True):
        assert torch.equal(got, want)


def test_copy_all_layer_kv_cache_empty_and_mismatched() -> None:
    buf = torch.arange(12, dtype=torch.float32).view(6, 2)
    ptrs = torch.tensor([buf.data_ptr()], dtype=torch.uint64)
    strides = torch.tensor([8])
    copy_all_layer_kv_cache_cpu(ptrs, strides, torch.empty(0, dtype=torch.int64),
                                torch.empty(0, dtype=torch.int64))
    assert torch.equal(buf, torch.arange(12, dtype=torch.float32).view(6, 2))
    with pytest.raises(ValueError, match="rows"):
        copy_all_layer_kv_cache_cpu(ptrs, strides, torch.tensor([1, 2]), torch.tensor([3]))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("use_out", [False, True])
def test_rmsnorm_matches_reference(dtype: torch.dtype, tol: float, use_out: bool) -> None:
    x = torch.randn(5, 96).to(dtype)
    w = torch.randn(96).to(dtype)
    xf = x.float()
    want = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()).to(dtype)
    out = torch.empty_like(x) if use_out else None
    got = rmsnorm(x, w, 1e-5, out=out)
    assert got.dtype == dtype
    if out is not None:
        assert got is out
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", NOT_PROVIDED)
def test_ops_not_provided_raise_naming_themselves(name: str) -> None:
    with pytest.raises(NotImplementedError, match=name):
        not_provided(name)(torch.zeros(1))


def test_shim_exports_and_refusals() -> None:
    code = f"""
import sys, json
sys.path.insert(0, {str(SHIM_DIR)!r})
import sgl_kernel
from sgl_kernel import verify_tree_greedy_cpu, copy_all_layer_kv_cache_cpu
try:
    verify_tree_greedy_cpu()
    called = "no error"
except NotImplementedError as e:
    called = str(e)
try:
    from sgl_kernel import no_such_op
    unknown = "imported"
except ImportError as e:
    unknown = "ImportError"
print(json.dumps([sgl_kernel.KVEXT_FALLBACK, called, unknown]))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    fallback, called, unknown = json.loads(result.stdout.strip().splitlines()[-1])
    assert fallback is True
    assert "verify_tree_greedy_cpu" in called
    assert unknown == "ImportError"


SGLANG_CALLERS = """
import json, torch
from sgl_kvext.sglang_plugin.kernel_fallback import ensure_sgl_kernel
status = ensure_sgl_kernel()
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.allocation import assign_req_to_token_pool_func
import sgl_kernel

pool = MHATokenToKVPool(64, 1, torch.bfloat16, 3, 8, 2, "cpu", False, enable_kv_cache_copy=True)
bufs = pool.k_buffer + pool.v_buffer
for b in bufs:
    b.copy_(torch.randn(b.shape).to(b.dtype))
want = [b.clone() for b in bufs]
tgt, src = torch.tensor([5, 9, 40, 63]), torch.tensor([1, 2, 3, 0])
for w in want:
    w[tgt] = w[src].clone()
pool.move_kv_cache(tgt, src)
moved = all(torch.equal(a, b) for a, b in zip(bufs, want))

table = torch.zeros((4, 16), dtype=torch.int32)
assign_req_to_token_pool_func(torch.tensor([2, 0]), table, torch.tensor([3, 0]),
                              torch.tensor([6, 2]), torch.tensor([11, 12, 13, 14, 15]), 2)
assigned = table[2, 3:6].tolist() == [11, 12, 13] and table[0, :2].tolist() == [14, 15]
print(json.dumps([status.source.value, getattr(sgl_kernel, "KVEXT_FALLBACK", False),
                  moved, assigned]))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback only acts without CUDA")
@pytest.mark.e2e
def test_sglang_cpu_engine_callers_use_the_fallback() -> None:
    """SGLang's own pool and allocator code, run on its CPU engine, through the shim."""
    result = run_python(SGLANG_CALLERS)
    assert result.returncode == 0, result.stderr[-3000:]
    source, is_fallback, moved, assigned = json.loads(result.stdout.strip().splitlines()[-1])
    assert (source, is_fallback, moved, assigned) == ("fallback", True, True, True)
