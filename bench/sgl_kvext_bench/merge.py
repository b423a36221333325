"""One blend sweep out of several ``sgl-kvext-bench blend`` runs over the same prompts.

A sweep of many methods at 200 questions takes hours on a CPU; run in slices that share one
``--reference-cache``, each slice is written when it ends, and :func:`merge_blend_runs` puts
their runs side by side again (one JSON, CSV and plot, as if one run had made them). Runs
merge only when they asked the same questions of the same model the same way and their
exact answers agree on every question.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# What makes two runs' prompts and exact references the same.
SAME = ("model", "dtype", "workload", "questions", "answer_tokens")


def merge_blend_runs(parts: Sequence[Mapping[str, Any]], names: Sequence[str]
                     ) -> dict[str, Any]:
    """``parts`` (results of ``run_blend``, rows included) as one; ``names`` label them in
    errors. ValueError names the first part that does not belong with the first one."""
    if len(parts) < 2:
        raise ValueError("merge needs at least two blend results")
    first = parts[0]
    exact = {row["question"]: row["exact_answer"] for row in first["rows"]}
    seen: dict[tuple[str, float], str] = {}
    for part, name in zip(parts, names, strict=True):
        if "runs" not in part or "rows" not in part:
            raise ValueError(f"{name}: not the results of sgl-kvext-bench blend")
        for field in SAME:
            if part.get(field) != first.get(field):
                raise ValueError(f"{name}: its {field} differs from {names[0]}'s; only runs "
                                 "over the same prompts merge")
        for row in part["rows"]:
            if exact.setdefault(row["question"], row["exact_answer"]) != row["exact_answer"]:
                raise ValueError(f"{name}: the exact answer of question {row['question']} "
                                 f"differs from {names[0]}'s (share one --reference-cache)")
        for run in part["runs"]:
            run_key = (run["method"], float(run["ratio"]))
            if run_key in seen:
                raise ValueError(f"{name}: {run_key[0]} at ratio {run_key[1]} is also in "
                                 f"{seen[run_key]}")
            seen[run_key] = name
    full = [p["full_prefill_ttft_p50_s"] for p in parts]
    return {**{k: v for k, v in first.items() if k not in ("runs", "rows")},
            "full_prefill_ttft_p50_s": sorted(full)[len(full) // 2],
            "merged_from": list(names),
            "runs": [run for p in parts for run in p["runs"]],
            "rows": [row for p in parts for row in p["rows"]]}
