"""One blend sweep out of several ``sgl-kvext-bench blend`` runs over the same prompts.

A sweep of many methods at 200 questions takes hours on a CPU; run in slices that share one
``--reference-cache``, each slice is written when it ends, and :func:`merge_blend_runs` puts
their runs side by side again (one JSON, CSV and plot). Runs merge only when they asked the
same questions of the same model the same way and their exact answers agree on every
question.

Slices run at different times on a shared machine, whose speed drifts by the hour. A run
repeated in a later slice (same method and ratio) ties the two together: its first run
stands, the repeat must give the same answers (same code, same prompts), and the later
slice's TTFTs are scaled by the first run's p50 over the repeat's (the geometric mean over
its repeats), so every TTFT is a ratio measured side by side, in the first slice's seconds.
A slice that repeats nothing keeps its own seconds (``ttft_scale`` 1, ``scaled_by`` empty).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# What makes two runs' prompts and exact references the same.
SAME = ("model", "dtype", "workload", "questions", "answer_tokens")

Key = tuple[str, float]


def merge_blend_runs(parts: Sequence[Mapping[str, Any]], names: Sequence[str]
                     ) -> dict[str, Any]:
    """``parts`` (results of ``run_blend``, rows included) as one; ``names`` label them in
    errors. ValueError names the first part that does not belong with the first one."""
    if len(parts) < 2:
        raise ValueError("merge needs at least two blend results")
    first = parts[0]
    exact = {row["question"]: row["exact_answer"] for row in first["rows"]}
    kept: dict[Key, dict[str, Any]] = {}            # run -> its first (scaled) entry
    answers: dict[Key, dict[Any, str]] = {}
    rows: list[dict[str, Any]] = []
    sources: list[dict[str, Any]] = []
    for part, name in zip(parts, names, strict=True):
        _check_same(part, name, first, names[0], exact)
        mine = {_key(r): r for r in part["runs"]}
        rows_of: dict[Key, list[Mapping[str, Any]]] = {key: [] for key in mine}
        for row in part["rows"]:                        # grouped once, per run
            rows_of.setdefault(_key(row), []).append(row)
        given = {key: {r["question"]: r["blend_answer"] for r in rows_of[key]} for key in mine}
        repeats = [key for key in mine if key in kept]
        for key in repeats:
            if given[key] != answers[key]:
                raise ValueError(f"{name}: {key[0]} at ratio {key[1]} answers otherwise than "
                                 f"in {kept[key]['slice']} (not the same code or prompts)")
        scale = math.exp(sum(math.log(kept[k]["ttft_p50_s"] / mine[k]["ttft_p50_s"])
                             for k in repeats) / len(repeats)) if repeats else 1.0
        sources.append({"path": name, "ttft_scale": scale,
                        "scaled_by": [f"{m}@{r}" for m, r in repeats]})
        for key, run in mine.items():
            if key in kept:
                continue                                # its first run stands
            kept[key] = {**run, "ttft_p50_s": run["ttft_p50_s"] * scale,
                         "speedup": run["speedup"] / scale, "ttft_scale": scale, "slice": name}
            answers[key] = given[key]
            rows += [{**r, "ttft_s": float(r["ttft_s"]) * scale} for r in rows_of[key]]
    full = [p["full_prefill_ttft_p50_s"] for p in parts]
    return {**{k: v for k, v in first.items() if k not in ("runs", "rows")},
            "full_prefill_ttft_p50_s": sorted(full)[len(full) // 2],
            "merged_from": sources, "runs": list(kept.values()), "rows": rows}


def _check_same(part: Mapping[str, Any], name: str, first: Mapping[str, Any], first_name: str,
                exact: dict[Any, str]) -> None:
    """ValueError unless ``part`` asked ``first``'s questions and got its exact answers."""
    if "runs" not in part or "rows" not in part:
        raise ValueError(f"{name}: not the results of sgl-kvext-bench blend")
    for field in SAME:
        if part.get(field) != first.get(field):
            raise ValueError(f"{name}: its {field} differs from {first_name}'s; only runs over "
                             "the same prompts merge")
    for row in part["rows"]:
        if exact.setdefault(row["question"], row["exact_answer"]) != row["exact_answer"]:
            raise ValueError(f"{name}: the exact answer of question {row['question']} differs "
                             f"from {first_name}'s (share one --reference-cache)")


def _key(run: Mapping[str, Any]) -> Key:
    return run["method"], float(run["ratio"])
