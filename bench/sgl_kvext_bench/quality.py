"""One quality harness for blended answers, offline and on a server.

For every question the blended answer stands beside the exact answer of the same prompt (a
full prefill, or the server's exact mode). :func:`summarize` reports the accuracy of both with
standard errors, the paired difference with its standard error, first-token KL (mean and
median) and top-1 agreement of the blended distribution against the exact one, and the
questions whose answer flipped.

First-token KL is exact offline (whole logit vectors). A server returns log-probabilities of
chosen tokens only: :func:`kl_top` takes the exact answer's top-K tokens plus one bucket for
the rest of the mass, and the blended answer's log-probabilities of those same tokens
(SGLang's ``token_ids_logprob``). Grouping outcomes can only lower a KL divergence, so that
figure is a lower bound, tight when the top K hold nearly all the mass.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch


class Pair(NamedTuple):
    """One question answered exactly and blended."""

    question: int
    exact_correct: bool
    blend_correct: bool
    kl: float
    top1_agree: bool


def kl_full(exact_logits: torch.Tensor, blend_logits: torch.Tensor) -> float:
    """KL(exact || blend) of the two softmax distributions ([vocab] logits each)."""
    p = torch.log_softmax(exact_logits.double(), -1)
    q = torch.log_softmax(blend_logits.double(), -1)
    return float((p.exp() * (p - q)).sum())


def kl_top(exact: Mapping[int, float], blend: Mapping[int, float]) -> float:
    """KL(exact || blend) over the tokens of ``exact`` (token -> log-probability: the exact
    answer's top K) and one bucket for every other token; ``blend`` holds the blended
    log-probabilities of the same tokens. A lower bound of the full KL (module doc)."""
    if not exact or set(exact) - set(blend):
        raise ValueError("blend needs a log-probability for every token of exact")
    kl, p_rest, q_rest = 0.0, 1.0, 1.0
    for token, lp in exact.items():
        p, lq = math.exp(lp), blend[token]
        kl += p * (lp - lq)
        p_rest -= p
        q_rest -= math.exp(lq)
    p_rest, q_rest = max(p_rest, 0.0), max(q_rest, 1e-12)
    if p_rest > 1e-12:
        kl += p_rest * math.log(p_rest / q_rest)
    return max(kl, 0.0)


def _stderr(values: Sequence[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def summarize(pairs: Sequence[Pair]) -> dict[str, Any]:
    """Accuracy of both with standard errors, the paired difference (blend - exact) and its
    standard error, KL mean / median, top-1 agreement, and the flipped questions."""
    if not pairs:
        raise ValueError("no questions to summarize")
    exact = [float(p.exact_correct) for p in pairs]
    blend = [float(p.blend_correct) for p in pairs]
    delta = [b - e for b, e in zip(blend, exact, strict=True)]
    kls = [p.kl for p in pairs]
    return {
        "questions": len(pairs),
        "exact_accuracy": statistics.mean(exact), "exact_stderr": _stderr(exact),
        "blend_accuracy": statistics.mean(blend), "blend_stderr": _stderr(blend),
        "accuracy_delta": statistics.mean(delta), "delta_stderr": _stderr(delta),
        "kl_mean": statistics.mean(kls), "kl_median": statistics.median(kls),
        "top1_agreement": statistics.mean(float(p.top1_agree) for p in pairs),
        "flipped_to_wrong": [p.question for p in pairs if p.exact_correct and not p.blend_correct],
        "flipped_to_right": [p.question for p in pairs if p.blend_correct and not p.exact_correct],
    }


def describe(summary: Mapping[str, Any]) -> str:
    """One line: accuracies with standard errors, the delta, KL, top-1."""
    s = summary
    return (f"{s['questions']} questions: exact {s['exact_accuracy']:.3f} ± "
            f"{s['exact_stderr']:.3f}, blend {s['blend_accuracy']:.3f} ± {s['blend_stderr']:.3f} "
            f"(delta {s['accuracy_delta']:+.3f} ± {s['delta_stderr']:.3f}); first-token KL "
            f"mean {s['kl_mean']:.4f} median {s['kl_median']:.4f}; top-1 agreement "
            f"{s['top1_agreement']:.3f}")


def _pairs_of(result: Mapping[str, Any], method: str, ratio: float, config: str
              ) -> tuple[list[Pair], list[Mapping[str, Any]]]:
    """The pairs (in question order) and raw rows of one run of a ``blend`` or ``rag`` JSON."""
    if "runs" in result:                                     # sgl-kvext-bench blend
        rows = [r for r in result["rows"] if r["method"] == method
                and math.isclose(r["ratio"], ratio)]
        if not rows:
            raise ValueError(f"the blend results have no run {method} @ {ratio}")
        return [Pair(i + 1, r["exact_correct"], r["blend_correct"], r["kl"], r["top1_agree"])
                for i, r in enumerate(rows)], rows
    runs = {c["name"]: c for c in result.get("configs", ())}
    if config not in runs or not runs[config].get("quality"):
        raise ValueError(f"the rag results have no quality columns for {config!r} (has: "
                         f"{', '.join(runs) or 'nothing'})")
    rows = runs[config]["questions"]
    return [Pair(i + 1, r["exact_correct"], r["correct"], r["kl"], r["top1_agree"])
            for i, r in enumerate(rows)], rows


def compare(a: Mapping[str, Any], b: Mapping[str, Any], method: str = "cacheblend",
            ratio: float = 0.15, config: str = "hierarchical_blend",
            method_b: str | None = None, ratio_b: float | None = None) -> dict[str, Any]:
    """Two runs over the same prompts (say the offline blend and the server, or two methods
    of one sweep: ``method_b`` / ``ratio_b`` pick ``b``'s run, by default ``a``'s): each one's
    summary, and per question the difference of their losses (``b``'s blend - exact minus
    ``a``'s) and of their first-token KLs, means and standard errors. ``within_one_stderr``:
    ``b`` loses no more than ``a`` beyond one standard error of that difference."""
    if a.get("workload") != b.get("workload"):
        raise ValueError("the two runs asked different questions (their 'workload' differs)")
    pa, rows_a = _pairs_of(a, method, ratio, config)
    pb, rows_b = _pairs_of(b, method_b or method, ratio if ratio_b is None else ratio_b,
                           config)
    if len(pa) != len(pb):
        raise ValueError(f"{len(pa)} questions against {len(pb)}")
    diff = [(float(y.blend_correct) - float(y.exact_correct))
            - (float(x.blend_correct) - float(x.exact_correct)) for x, y in zip(pa, pb,
                                                                               strict=True)]
    mean, se = statistics.mean(diff), _stderr(diff)
    kl = [y.kl - x.kl for x, y in zip(pa, pb, strict=True)]
    out = {"a": summarize(pa), "b": summarize(pb), "loss_difference": mean,
           "loss_difference_stderr": se, "within_one_stderr": mean >= -se,
           "kl_difference": statistics.mean(kl), "kl_difference_stderr": _stderr(kl),
           "exact_answers_agree": statistics.mean(
               float(x.exact_correct == y.exact_correct) for x, y in zip(pa, pb, strict=True))}
    for side, pairs, rows in (("a", pa, rows_a), ("b", pb, rows_b)):
        split = inherited_split(pairs, rows)
        if split:
            out[f"{side}_inherited"] = split
    return out


def inherited_split(pairs: Sequence[Pair], rows: Sequence[Mapping[str, Any]]
                    ) -> dict[str, Any] | None:
    """Server rows only: quality of the blended requests whose device prefix reached past the
    shared head (they reuse an earlier blended request's KV as an exact prefix) against the
    blended rest, and of the requests that were not blended. The head is the most common blend
    start; a blend report's ``start`` is the device prefix it blended after."""
    reports = [r.get("kvext_blend") for r in rows]
    starts = [int(rep["start"]) for rep in reports if rep and rep["outcome"] == "blended"]
    if not starts:
        return None
    head = statistics.mode(starts)
    groups: dict[str, list[Pair]] = {"inherited": [], "head_only": [], "not_blended": []}
    for pair, rep in zip(pairs, reports, strict=True):
        if not rep or rep["outcome"] != "blended":
            groups["not_blended"].append(pair)
        else:
            groups["inherited" if int(rep["start"]) > head else "head_only"].append(pair)
    return {"head_tokens": head, **{k: summarize(v) for k, v in groups.items() if v}}


def load_results(path: Path) -> dict[str, Any]:
    """A results JSON of ``blend`` or ``rag``; a ``blend`` run gets its per-question rows back
    from the CSV written beside it. ValueError names what is unreadable."""
    try:
        results: dict[str, Any] = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable results JSON ({exc})") from None
    if "runs" in results and "rows" not in results:
        try:
            with open(Path(path).with_suffix(".csv"), newline="") as f:
                rows = list(csv.DictReader(f))
        except OSError as exc:
            raise ValueError(f"{path}: the rows CSV beside it is missing ({exc})") from None
        results["rows"] = [{**r, "ratio": float(r["ratio"]), "kl": float(r["kl"]),
                            **{k: r[k] in ("1", "True") for k in (
                                "exact_correct", "blend_correct", "top1_agree")}}
                           for r in rows]       # report.write_csv: booleans as 0 / 1
    return results
