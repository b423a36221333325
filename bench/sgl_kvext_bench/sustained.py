"""Sustained request rate at a TTFT goal (``sgl-kvext-bench sustained``).

The multi-turn chat workload (:mod:`sgl_kvext_bench.multiturn`) at several arrival rates:
for each configuration and rate a fresh server (the same device pool, a quarter of the
working set), users running concurrently, request ``k`` sent at ``k / rate`` s or when its
user's previous answer is in (closed loop per user, so an overloaded server is not sent more
than its users can wait for). Per run: TTFT p50 / p90 over every request, and the rate
achieved (requests over the span of their send times: a server too slow for the offered rate
delays its users' next turns, so the sends spread out).

A run *keeps the goal* when its p90 TTFT is within it and it achieved at least
:data:`KEPT_UP` of the offered rate. A configuration *sustains* a rate when every run of it at
that rate and at every lower rate tried kept the goal: with ``repeats`` > 1 each rate is run
that many times, because on a small machine a queue that once falls behind may grow for the
rest of a run while the next run at the same rate stays short (measured: radix's p90 at 1
req/s was 17.7 s in one run and 1.35 s at 1.5 req/s in the next). With ``warmup_turns`` the
first turns of every user are sent before the clock starts, unthrottled, and left out: the
figures are then those of established sessions, not of every user's cold first request
arriving at once (with long private contexts that burst alone sets the p90, in every
configuration alike). Once a configuration missed the goal at a rate, its later runs at that
rate and above are skipped (listed in ``skipped``): they cannot change its sustained rate,
and an overloaded run is the longest.
The figure compared is ``hierarchical``'s sustained rate over ``radix``'s, both measured in
one run (the same machine state, interleaved by rate and repeat).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from sgl_kvext_bench.configs import CONFIGS
from sgl_kvext_bench.multiturn import Workload, percentile, run_workload, working_set_tokens
from sgl_kvext_bench.serving import Serving

#: A run keeps up when it achieves at least this share of the offered rate.
KEPT_UP = 0.9


def kept_goal(run: dict[str, Any], goal_p90_s: float) -> bool:
    """Whether one run kept the goal: p90 TTFT within it, at least :data:`KEPT_UP` achieved."""
    return (run["ttft_p90_s"] <= goal_p90_s
            and run["achieved_rps"] >= KEPT_UP * run["offered_rps"])


def decided(runs: Sequence[dict[str, Any]], name: str, rate: float, goal_p90_s: float) -> bool:
    """Whether a run of ``name`` at ``rate`` can no longer change its sustained rate: a run of
    it at this rate or a lower one already missed the goal (so ``rate`` is not sustained)."""
    return any(r["name"] == name and r["offered_rps"] <= rate and not kept_goal(r, goal_p90_s)
               for r in runs)


def sustained_rates(runs: Sequence[dict[str, Any]], goal_p90_s: float
                    ) -> dict[str, float | None]:
    """Per configuration, the highest offered rate it sustained: every run at it and at every
    lower rate kept the goal (None: not even the lowest rate tried)."""
    kept: dict[str, dict[float, bool]] = {}
    for run in runs:
        ok = kept_goal(run, goal_p90_s)
        rates = kept.setdefault(run["name"], {})
        rates[run["offered_rps"]] = rates.get(run["offered_rps"], True) and ok
    out: dict[str, float | None] = {}
    for name, rates in kept.items():
        out[name] = None
        for rate in sorted(rates):
            if not rates[rate]:
                break
            out[name] = rate
    return out


def run_sustained(serving: Serving, work: Workload, configs: Sequence[str],
                  rates: Sequence[float], goal_p90_s: float, pool_fraction: float = 0.25,
                  progress: Callable[[str], None] = print, repeats: int = 1,
                  warmup_turns: int = 0) -> dict[str, Any]:
    """Every configuration at every rate, each on a fresh server (see the module doc); the
    first ``warmup_turns`` turns of every user are sent before the clock starts and left out
    of every figure (their rows say ``measured: false``)."""
    from transformers import AutoTokenizer

    if serving.model_path is None:
        raise ValueError("sustained starts its own servers: it needs the model, not --url")
    total, longest = working_set_tokens(work, AutoTokenizer.from_pretrained(serving.model_path))
    pool = max(int(total * pool_fraction), longest + 256)
    runs: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    plan = [(rate, name) for rate in rates for _ in range(repeats) for name in configs]
    for rate, name in plan:                     # by rate, repeat, configuration: interleaved
        if decided(runs, name, rate, goal_p90_s):
            skipped.append({"name": name, "offered_rps": rate})
            progress(f"sustained: {name} at {rate:g} req/s skipped: a run at or below it "
                     "missed the goal")
            continue
        args = ("--max-total-tokens", str(pool), *CONFIGS.get(name, ()))
        with serving.serve(f"sustained-{rate:g}", name, args) as target:
            started = time.perf_counter()
            samples = run_workload(target, name, work, progress, rate, warmup_turns)
            wall = time.perf_counter() - started
        measured = [s for s in samples if s.measured]
        ttfts, sent = [s.ttft_s for s in measured], [s.sent_s for s in measured]
        span = max(sent) - min(sent)
        runs.append({"name": name, "offered_rps": rate,
                     "achieved_rps": (len(sent) - 1) / span if span > 0 else 0.0,
                     "ttft_p50_s": statistics.median(ttfts),
                     "ttft_p90_s": percentile(ttfts, 0.9),
                     "cached_share": sum(s.cached_tokens for s in measured)
                     / max(1, sum(s.prompt_tokens for s in measured)),
                     "wall_s": wall, "requests": [asdict(s) for s in samples]})
        progress(f"sustained: {name} at {rate:g} req/s: p90 TTFT "
                 f"{runs[-1]['ttft_p90_s']:.2f}s, achieved {runs[-1]['achieved_rps']:.2f}")
    sustained = sustained_rates(runs, goal_p90_s)
    ours, theirs = sustained.get("hierarchical"), sustained.get("radix")
    return {"workload": asdict(work), "working_set_tokens": total, "pool_tokens": pool,
            "goal_p90_s": goal_p90_s, "warmup_turns": warmup_turns, "rates": list(rates),
            "repeats": repeats, "runs": runs, "skipped": skipped,
            "sustained_rps": sustained,
            "hierarchical_over_radix": (ours / theirs if ours and theirs else None)}
