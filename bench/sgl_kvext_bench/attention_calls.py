"""``kvext_cpu`` attention in-process: an extend over a cached prefix as one masked call over
its keys put end to end against two calls (the cached keys, then the queries' own, causally)
merged by log-sum-exp.

The backend takes one call up to ``ONE_CALL_KEYS`` keys in all
(``sgl_kvext_kernels.reference.subset_attention``); ``split`` forces the two calls everywhere.
Cases around that limit and past it (where both modes run the same two calls), on the pool
layouts of :mod:`sgl_kvext_bench.attention_layouts` (SmolLM2-135M's attention shape, 30 layers,
bf16; the two modes alternate, medians of ``repeats`` rounds).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from typing import Any

from sgl_kvext_bench.attention_layouts import Case, patched, time_modes

CASES = (Case("extend 54 over 900 in three runs", 900, 3, 54),
         Case("extend 200 over 1,000 in one run", 1000, 1, 200),
         Case("extend 55 over 1,990 in one run", 1990, 1, 55),
         Case("extend 16 over 2,000 in two runs", 2000, 2, 16),
         Case("extend 55 over 3,000 in one run (past the limit)", 3000, 1, 55),
         Case("extend 5 over 4,278 in four runs (past the limit)", 4278, 4, 5))


def run_calls(repeats: int, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Milliseconds per forward (all layers) of each case, split vs one call, and the ratio."""
    from sgl_kvext.sglang_plugin import cpu_attention

    split = partial(cpu_attention.suffix_attention, one_call_keys=0)
    return time_modes(CASES, {"split": lambda: patched(cpu_attention, "suffix_attention", split),
                              "one_call": nullcontext}, repeats, progress)
