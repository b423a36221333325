"""``kvext_cpu`` attention in-process: a request's KV read in place (the keys before the queries'
own as a view when their slots are one run) against gathered whole, on the layouts a server
produces.

SmolLM2-135M's attention shape (30 layers, 9 query and 3 KV heads of 64, bf16), one request,
the backend's own extend and decode called once per layer over SGLang's paged-pool layout:
its cached prefix in one run of slots or in four runs out of order (a tier load's fresh slots),
the new tokens' slots elsewhere. ``gathered``: the request's whole KV copied out per layer
(what the backend did until 2026-12-06); ``views``: the backend as it is. The two alternate,
in turn first, each figure the median of ``repeats`` rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from typing import Any, NamedTuple

import torch

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 30, 9, 3, 64


class Case(NamedTuple):
    """One request: ``cached`` prefix tokens in ``runs`` runs, ``new`` tokens after them."""

    name: str
    cached: int
    runs: int
    new: int


CASES = (Case("extend 5 over 4,278 in one run", 4278, 1, 5),
         Case("extend 5 over 4,278 in four runs", 4278, 4, 5),
         Case("decode at 4,300, one run", 4299, 1, 1),
         Case("decode at 4,300, four runs", 4299, 4, 1),
         Case("extend 54 over 900 in three runs", 900, 3, 54),
         Case("decode at 950, three runs", 949, 3, 1))


def _request(case: Case, slots: int) -> dict[str, torch.Tensor]:
    """The pool rows and metadata of ``case``: its runs out of order, new slots at the end."""
    cuts = [case.cached * i // case.runs for i in range(case.runs + 1)]
    stride = slots // (case.runs + 1)
    runs = [torch.arange(stride * i, stride * i + b - a)
            for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False))]
    order = runs[1:] + runs[:1]
    new = torch.arange(slots - case.new, slots)
    total = case.cached + case.new
    req_to_token = torch.zeros((2, total + 8), dtype=torch.int32)
    req_to_token[1, :total] = torch.cat([*order, new])
    return {"req_to_token": req_to_token, "req_pool_indices": torch.tensor([1]),
            "seq_lens": torch.tensor([total]), "prefix": torch.tensor([case.cached]),
            "new": torch.tensor([case.new])}


def run_layouts(repeats: int, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Milliseconds per forward (all layers) of each case, gathered vs views, and the ratio."""
    from sgl_kvext.sglang_plugin import cpu_attention

    gathered = partial(_gather_all, cpu_attention._layout)
    return time_modes(CASES, {"gathered": lambda: patched(cpu_attention, "_layout", gathered),
                              "views": nullcontext}, repeats, progress)


@contextmanager
def patched(module: Any, name: str, value: Any) -> Iterator[None]:
    """``module.name`` is ``value`` for the time of the block (a mode of :func:`time_modes`)."""
    kept = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, kept)


def time_modes(cases: Sequence[Case], modes: dict[str, Callable[[], AbstractContextManager[Any]]],
               repeats: int, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Milliseconds per forward (all layers) of each case under each of two ``modes`` (a
    context that patches the backend for the time of a round), and first / second. The modes
    alternate, in turn first; the first round is not counted; their outputs must agree."""
    from sgl_kvext.sglang_plugin import cpu_attention

    gen = torch.Generator().manual_seed(0)
    slots = 24_000
    k = torch.randn(slots, KV_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    v = torch.randn(slots, KV_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    cls = cpu_attention.KVExtCPUAttnBackend
    names = list(modes)
    out: dict[str, Any] = {"repeats": repeats, "cases": {}}
    for case in cases:
        req = _request(case, slots)
        q = torch.randn(case.new, HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
        results = {m: torch.empty_like(q) for m in names}
        times: dict[str, list[float]] = {m: [] for m in names}
        for r in range(repeats + 1):
            for mode in names if r % 2 else names[::-1]:
                backend = object.__new__(cls)            # fresh: no layout kept from before
                with modes[mode]():
                    start = time.perf_counter()
                    for _layer in range(LAYERS):
                        _forward(cls, backend, q, results[mode], k, v, req)
                    times[mode].append(time.perf_counter() - start)
        if not torch.allclose(results[names[0]].float(), results[names[1]].float(),
                              atol=2e-2, rtol=2e-2):
            raise AssertionError(f"{case.name}: {names[0]} and {names[1]} attention differ")
        row = {m: statistics.median(times[m][1:]) * 1e3 for m in names}
        out["cases"][case.name] = {"cached": case.cached, "runs": case.runs, "new": case.new,
                                   **{f"{m}_ms": row[m] for m in names},
                                   "speedup": row[names[0]] / row[names[1]]}
        progress(f"{case.name}: " + ", ".join(f"{m} {row[m]:.1f} ms" for m in names))
    return out


def _gather_all(layout_of: Callable[[torch.Tensor, int], Any], slots: torch.Tensor,
                n_new: int) -> Any:
    """The layout of the backend before 2026-12-06: the backend's own (``layout_of``), but the
    keys before the queries' own gathered even when their slots are one run."""
    layout = layout_of(slots, n_new)
    if isinstance(layout.prefix, tuple):                 # it starts at the request's first slot
        layout = layout._replace(prefix=slots[:layout.prefix[1]])
    return layout


def _forward(cls: type, backend: Any, q: torch.Tensor, out: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, req: dict[str, torch.Tensor]) -> None:
    """One layer's attention of the request, as SGLang calls the backend."""
    if q.shape[0] == 1:
        cls._run_sdpa_forward_decode(backend, q, out, k, v, req["req_to_token"],
                                     req["req_pool_indices"], req["seq_lens"], None,
                                     scaling=HEAD_DIM ** -0.5, enable_gqa=True, causal=False)
    else:
        cls._run_sdpa_forward_extend(backend, q, out, k, v, req["req_to_token"],
                                     req["req_pool_indices"], req["seq_lens"], req["prefix"],
                                     req["new"], None, scaling=HEAD_DIM ** -0.5,
                                     enable_gqa=True, causal=True)
