"""A second, exact pass where the blended answer is a close call (``sgl-kvext-bench gate``).

The first-token KL of a blend is a tail, and what predicts it is the model's own uncertainty
(docs/cacheblend.md, "Open work"). A gate at entropy ``tau`` (nats of the blended first-token
distribution) prefills a prompt again, exactly, when the blend's entropy is above ``tau``.
Its outcome on each prompt follows from one blend run's rows without running it again: below
the gate the blended answer, KL and TTFT; above it the exact answer (KL 0, top-1 agreeing)
at the blend's TTFT plus the exact prefill's (both measured on that prompt), so every point
of the curve is measured, not modelled. ``sgl-kvext-bench blend`` runs the gate for real as
``*_fallback`` methods (the same rule, :class:`~sgl_kvext_bench.blend.Method`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from sgl_kvext_bench.quality import Pair, summarize


def _flag(value: Any) -> bool:
    return value in (True, "1", "True")


def gate_curve(rows: Sequence[Mapping[str, Any]], method: str, ratio: float,
               thresholds: Sequence[float]) -> list[dict[str, Any]]:
    """Per threshold (``inf``: never), the quality summary, the share of prompts prefilled
    again and the TTFT p50 / mean / p90 of ``method`` at ``ratio`` under the gate. ValueError
    when the run has no such rows or its rows carry no blended entropy (runs before
    2026-12-06)."""
    mine = [r for r in rows if r["method"] == method and math.isclose(float(r["ratio"]), ratio)]
    if not mine:
        raise ValueError(f"no rows of method {method!r} at ratio {ratio:g}")
    if any(r.get("blend_entropy") in (None, "") or _flag(r.get("fell_back")) for r in mine):
        raise ValueError(f"{method!r}: the rows need blend_entropy from a run without a gate")
    out = []
    for tau in thresholds:
        pairs, ttfts, caught = [], [], 0
        for r in mine:
            again = float(r["blend_entropy"]) > tau
            caught += again
            exact_ok = _flag(r["exact_correct"])
            pairs.append(Pair(int(r["question"]), exact_ok,
                              exact_ok if again else _flag(r["blend_correct"]),
                              0.0 if again else float(r["kl"]),
                              True if again else _flag(r["top1_agree"])))
            ttfts.append(float(r["ttft_s"]) + (float(r["full_ttft_s"]) if again else 0.0))
        ordered = sorted(ttfts)
        out.append({"threshold": tau, "fallback_share": caught / len(mine),
                    "ttft_p50_s": statistics.median(ttfts), "ttft_mean_s": statistics.mean(ttfts),
                    "ttft_p90_s": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
                    **{k: v for k, v in summarize(pairs).items() if not isinstance(v, list)}})
    return out
