"""What the fragment-blend server tests share: a small RAG corpus, prompts, metrics."""

from __future__ import annotations

import time
from typing import Any

from sgl_kvext.harness.server import Completion, SGLangServer
from sgl_kvext_bench.rag_set import make_rag_set

RAG = make_rag_set(documents=10, questions=4, chunks=(4, 4), sentences=24, seed=5)  # ~340 tokens
DOCS = RAG.documents
MAX_NEW = 8
COMMON = ["--dtype", "float32", "--enable-hierarchical-kv", "--kvext-fragment-blend",
          "--kvext-fragment-min-tokens", "16", "--kvext-host-size", "2GiB", "--enable-metrics",
          "--max-total-tokens", "32768",   # bounded: the default pool takes most of the RAM
          "--kvext-prewarm-queue", "8",    # small, so a test can fill it
          "--kvext-metrics-interval", "0.1"]
# Every blend runs (close calls have their own test and server).
ARGS = [*COMMON, "--kvext-blend-fallback-entropy", "inf"]
METRICS_SYNC_S = 1.5      # as with 1 s copies (0.6 s failed a CI run on 2026-12-05)


def fragment_args(s3_prefix: str, endpoint: str) -> list[str]:
    """The shared fragment server's flags: ARGS with an S3 tier other instances read."""
    return [*ARGS, "--kvext-s3-url", f"s3://kvext-e2e/{s3_prefix}", "--kvext-s3-endpoint",
            endpoint]


def prompt(head: str, docs: list[int], question: str) -> str:
    return head + "".join(DOCS[d] + "\n" for d in docs) + f"Question: {question}\nAnswer:"


FIRST = prompt("Use the documents.\n", [0, 1, 2, 3], "Which project has code 1?")
# Documents 1 and 2 again, at other offsets, after another document, with other text first.
SECOND = prompt("Read these notes carefully, then answer briefly.\n", [5, 2, 1],
                "Which city is named?")
# Documents 2 and 1 again at other positions: their automatic fragments register.
AGAIN = prompt("Background:\n", [2, 1], "What is listed?")
UNSEEN = prompt("Use the documents.\n", [6, 7], "Who is mentioned?")


def metric(server: SGLangServer, name: str) -> float:
    time.sleep(METRICS_SYNC_S)
    total = 0.0
    for line in server.get_text("/metrics").splitlines():
        if line.startswith(f"kvext_fragment_{name}_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_registered(server: SGLangServer, more_than: float, timeout_s: float = 120) -> float:
    """Wait until registration settles above ``more_than`` (unchanged for 3 s)."""
    deadline = time.monotonic() + timeout_s
    last, since = -1.0, time.monotonic()
    while time.monotonic() < deadline:
        now = metric(server, "registered")
        if now != last:
            last, since = now, time.monotonic()
        elif now > more_than and time.monotonic() - since >= 3.0:
            return now
        time.sleep(0.5)
    raise AssertionError(f"registration did not settle above {more_than} in {timeout_s}s")


def ask(server: SGLangServer, text: str, **custom: Any) -> Completion:
    return server.generate(text, max_new_tokens=MAX_NEW, custom_params=custom or None)
