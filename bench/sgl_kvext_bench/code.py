"""Code-completion benchmark: one long file, successive edits near its end.

An editor assistant resends the whole file after every keystroke burst. Each request here is
the file with edits ``1..k`` applied, then a completion cue; edit ``k`` rewrites one line in the
last ``tail_share`` of the file, so request ``k`` shares the file up to that line with request
``k - 1`` and differs after it. A radix cache reuses the shared prefix; the rest, including
the unchanged tail after the edit, is recomputed. Configurations as in the RAG benchmark
(``configs.CONFIGS``), one server each, one after another; greedy answers, streamed TTFT.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sgl_kvext_bench.configs import CONFIGS
from sgl_kvext_bench.serving import Serving

NOUNS = ("order", "invoice", "customer", "shipment", "ledger", "account", "payment", "route",
         "parcel", "warehouse", "supplier", "discount")
VERBS = ("load", "validate", "merge", "compute", "format", "archive", "publish", "reconcile")
CUE = ('\n\ndef summarize_all(records):\n'
       '    """Return a one-line summary of every record."""\n')


@dataclass(frozen=True)
class CodeWorkload:
    functions: int = 64          # ~56 tokens each: a ~3.6k-token file
    edits: int = 8
    tail_share: float = 0.1      # edits land in the last 10% of the file's lines
    answer_tokens: int = 16
    seed: int = 0

    def file_lines(self) -> list[str]:
        rng = random.Random(self.seed)
        lines = ["import math", "from dataclasses import dataclass", ""]
        for i in range(self.functions):
            verb, noun = rng.choice(VERBS), rng.choice(NOUNS)
            lines += [f"def {verb}_{noun}_{i}(items, limit={rng.randint(2, 99)}):",
                      f"    \"\"\"{verb.capitalize()} each {noun} up to the limit.\"\"\"",
                      f"    total = sum(x * {rng.randint(2, 9)} for x in items[:limit])",
                      f"    return math.floor(total / {rng.randint(2, 9)})", ""]
        return lines

    def prompts(self) -> list[str]:
        """The file after edits ``1..k`` plus the cue, for ``k = 1 .. edits``."""
        rng = random.Random(f"{self.seed}-edits")
        lines = self.file_lines()
        first = int(len(lines) * (1 - self.tail_share))
        editable = [i for i in range(first, len(lines)) if "total = " in lines[i]]
        out = []
        for k in range(self.edits):
            i = rng.choice(editable)
            lines[i] = f"    total = sum(x * {rng.randint(10, 99)} for x in items[:limit])  # e{k}"
            out.append("\n".join(lines) + CUE)
        return out


def trace_requests(work: CodeWorkload, interval_s: float) -> list[Any]:
    """The edits as replay-trace requests, one every ``interval_s``."""
    from sgl_kvext_bench.replay import TraceRequest

    return [TraceRequest(k * interval_s, p, work.answer_tokens)
            for k, p in enumerate(work.prompts())]


def run_code(serving: Serving, work: CodeWorkload, configs: Sequence[str],
             progress: Callable[[str], None] = print) -> dict[str, Any]:
    """TTFT per edit for each configuration (or for the running server ``serving`` names);
    p50 / p90 over edits 2.. (edit 1 is cold)."""

    prompts = work.prompts()
    results: dict[str, Any] = {"workload": asdict(work), "configs": []}
    for name in serving.configs(configs):
        started = time.perf_counter()
        rows: list[dict[str, Any]] = []
        gaps: list[float] = []
        with serving.serve("code", name, CONFIGS.get(name, ())) as target:
            for k, prompt in enumerate(prompts, 1):
                r = target.generate(prompt, work.answer_tokens)
                gaps += r.itl_s
                rows.append({"edit": k, "ttft_s": r.ttft_s, "prompt_tokens": r.prompt_tokens,
                             "cached_tokens": r.cached_tokens})
                progress(f"{name}: edit {k}/{len(prompts)} ttft {r.ttft_s:.2f}s "
                         f"({r.cached_tokens}/{r.prompt_tokens} cached)")
        later = [r["ttft_s"] for r in rows[1:]] or [rows[0]["ttft_s"]]
        ordered = sorted(later)
        results["configs"].append({
            "name": name, "ttft_p50_s": statistics.median(later),
            "ttft_p90_s": ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))],
            "ttft_cold_s": rows[0]["ttft_s"], "wall_s": time.perf_counter() - started,
            "itl_p50_s": statistics.median(gaps) if gaps else None,
            "edits": rows})
    return results
