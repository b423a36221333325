"""The main-job demo: real SGLang on this machine serving SmolLM2 with --enable-hierarchical-kv.

A long shared context (a seeded synthetic ledger) is followed by several questions. The
first request computes the whole prompt; the next ones find the context in the radix tree
and only prefill their question. Then ``/flush_cache`` empties the radix tree and the first
question is asked again: the context comes back from the host tier, and the answer must be
the one the cold request gave. Cold, device-cached and host-tier time-to-first-token are
measured side by side in one run.

On a CPU the server runs in the dtype that is fast there (``server.dtype_flags``): float32
unless the CPU has bf16 matrix instructions.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path
from typing import NamedTuple

from sgl_kvext.harness.server import SGLangServer, dtype_flags

CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quebec", "Perth", "Tunis", "Riga", "Cusco")
ITEMS = ("copper wire", "olive oil", "glass jars", "wool socks", "rice", "lamp oil", "paper",
         "tin cans", "coffee beans", "rope")


class DemoRow(NamedTuple):
    label: str
    source: str          # where the context's KV came from: computed, device, host tier
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float
    answer: str


def build_context(records: int, seed: int = 0) -> tuple[str, list[str]]:
    """A ledger of ``records`` shipment lines and questions about some of them."""
    rng = random.Random(seed)
    lines, questions = [], []
    for i in range(records):
        city, item = rng.choice(CITIES), rng.choice(ITEMS)
        day, crates = rng.randint(1, 28), rng.randint(2, 99)
        lines.append(f"Entry {i + 1}: on day {day} the depot in {city} shipped {crates} "
                     f"crates of {item}.")
        if i % 7 == 3:
            questions.append(f"How many crates of {item} did the depot in {city} ship on day "
                             f"{day}?")
    context = ("You are a careful clerk. Answer from the shipping ledger below.\n\n"
               + "\n".join(lines) + "\n\n")
    return context, questions


def run_demo(model_path: Path, out_dir: Path, records: int = 90, questions: int = 4,
             extra_args: tuple[str, ...] = ()) -> list[DemoRow]:
    """Serve the prompts, print a table, write ``demo.json``; return the rows."""
    context, all_questions = build_context(records)
    asked = all_questions[:questions]
    dtype = dtype_flags(extra_args)
    args = ("--enable-hierarchical-kv", "--max-total-tokens", "32768", *dtype, *extra_args)
    rows: list[DemoRow] = []
    with SGLangServer(model_path, args, log_path=out_dir / "demo-server.log") as server:
        def ask(label: str, source: str, question: str) -> None:
            first = server.generate(context + question + "\nAnswer:", max_new_tokens=1)
            full = server.generate(context + question + "\nAnswer:", max_new_tokens=12)
            rows.append(DemoRow(label, source, first.prompt_tokens, first.cached_tokens,
                                first.seconds, full.text.strip()))

        server.generate("Hello", max_new_tokens=1)  # warm-up: first-request start-up costs
        ask("question 1, cold (context computed)", "computed", asked[0])
        for i, question in enumerate(asked[1:], start=2):
            ask(f"question {i} (context in the radix tree)", "device", question)
        server.flush_cache()
        time.sleep(1.0)
        ask("question 1 after /flush_cache (context from the host tier)", "host tier", asked[0])
    _report(rows, out_dir, dtype[1] if dtype else "server default")
    return rows


def _report(rows: list[DemoRow], out_dir: Path, dtype: str) -> None:
    cold = [r for r in rows if r.source == "computed"]
    device = [r.ttft_s for r in rows if r.source == "device"]
    host = [r for r in rows if r.source == "host tier"]
    speedup = cold[0].ttft_s / statistics.median(device)
    host_speedup = cold[0].ttft_s / host[0].ttft_s
    same = host[0].answer == cold[0].answer
    print(f"dtype: {dtype}\n")
    print("| request | prompt tokens | cached tokens | time to first token (s) | answer |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r.label} | {r.prompt_tokens} | {r.cached_tokens} | {r.ttft_s:.2f} | "
              f"{r.answer[:40]!r} |")
    print(f"\nSpeed-up over cold: {speedup:.1f}x with the context in the radix tree (median), "
          f"{host_speedup:.1f}x with it back from the host tier after /flush_cache")
    print("Answer after /flush_cache " + ("identical to the cold answer" if same else
                                          "DIFFERS from the cold answer"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "demo.json"
    path.write_text(json.dumps({"dtype": dtype, "rows": [r._asdict() for r in rows],
                                "speedup": speedup, "host_tier_speedup": host_speedup,
                                "same_answer_after_flush": same}, indent=2) + "\n")
    print(f"Results: {path}")
