"""One blend sweep out of several ``sgl-kvext-bench blend`` runs over the same prompts.

A sweep of many methods at 200 questions takes hours on a CPU; run in slices that share one
``--reference-cache``, each slice is written when it ends, and :func:`merge_blend_runs` puts
their runs side by side again (one JSON, CSV and plot). Runs merge only when they asked the
same questions of the same model the same way and their exact answers agree on every
question.

Slices run at different times on a shared machine, whose speed drifts by the hour. With an
anchor (a method and ratio every slice runs), each slice's TTFTs are scaled by the anchor's
p50 in the first slice over its p50 in that slice, so every method's TTFT is its ratio to the
anchor measured side by side, in the first slice's seconds. The anchor's repeats are
dropped; their answers must equal its first run's (same code, same prompts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

# What makes two runs' prompts and exact references the same.
SAME = ("model", "dtype", "workload", "questions", "answer_tokens")


class Anchor(NamedTuple):
    """The run every slice repeats: its method and ratio."""

    method: str
    ratio: float

    @classmethod
    def parse(cls, text: str) -> Anchor:
        """``METHOD@RATIO``, e.g. ``cacheblend@0.15``; ValueError names what is wrong."""
        method, _, ratio = text.partition("@")
        try:
            return cls(method, float(ratio))
        except ValueError:
            raise ValueError(f"--anchor {text!r}: need METHOD@RATIO, e.g. "
                             "cacheblend@0.15") from None


def merge_blend_runs(parts: Sequence[Mapping[str, Any]], names: Sequence[str],
                     anchor: Anchor | None = None) -> dict[str, Any]:
    """``parts`` (results of ``run_blend``, rows included) as one; ``names`` label them in
    errors. ValueError names the first part that does not belong with the first one."""
    if len(parts) < 2:
        raise ValueError("merge needs at least two blend results")
    first = parts[0]
    exact = {row["question"]: row["exact_answer"] for row in first["rows"]}
    anchor_answers: dict[Any, str] = {}
    anchor_p50 = 0.0
    seen: dict[tuple[str, float], str] = {}
    runs: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    sources: list[dict[str, Any]] = []
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
        scale = 1.0
        if anchor is not None:
            mine = [r for r in part["runs"] if _key(r) == anchor]
            if not mine:
                raise ValueError(f"{name}: has no run of the anchor {anchor.method} at ratio "
                                 f"{anchor.ratio}")
            answers = {r["question"]: r["blend_answer"] for r in part["rows"]
                       if _key(r) == anchor}
            if not anchor_answers:
                anchor_answers, anchor_p50 = answers, mine[0]["ttft_p50_s"]
            elif answers != anchor_answers:
                raise ValueError(f"{name}: the anchor's answers differ from {names[0]}'s "
                                 "(not the same code or prompts)")
            scale = anchor_p50 / mine[0]["ttft_p50_s"]
        sources.append({"path": name, "ttft_scale": scale})
        for run in part["runs"]:
            key = _key(run)
            if key == anchor and key in seen:
                continue                                # its first run stands
            if key in seen:
                raise ValueError(f"{name}: {key[0]} at ratio {key[1]} is also in {seen[key]}")
            seen[key] = name
            runs.append({**run, "ttft_p50_s": run["ttft_p50_s"] * scale,
                         "speedup": run["speedup"] / scale, "ttft_scale": scale})
            rows += [{**r, "ttft_s": float(r["ttft_s"]) * scale} for r in part["rows"]
                     if _key(r) == key]
    full = [p["full_prefill_ttft_p50_s"] for p in parts]
    return {**{k: v for k, v in first.items() if k not in ("runs", "rows")},
            "full_prefill_ttft_p50_s": sorted(full)[len(full) // 2],
            "merged_from": sources, "anchor": anchor._asdict() if anchor else None,
            "runs": runs, "rows": rows}


def _key(run: Mapping[str, Any]) -> tuple[str, float]:
    return run["method"], float(run["ratio"])
