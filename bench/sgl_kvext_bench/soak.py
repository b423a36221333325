"""Memory soak: a long mixed multi-turn + RAG run on one hierarchical server.

The server runs with a small device pool, a host tier of ``host_size``, a disk tier and
fragment blend, so KV keeps spilling, loading back and being blended. Requests go one at a
time, alternating a multi-turn chat (users whose sessions restart every few turns, so new KV
keeps arriving) and a RAG question with marked documents. The RAG corpus is pre-warmed
before the clock starts (registering it is a one-time cost, not the steady state). Every
``sample_s`` seconds the resident set size of every process of the server (its process
group, from ``/proc``) and the host tier's bytes (``/metrics``) are sampled.

RSS is also read at rest, right after each request (one runs at a time). Flat means: the
at-rest samples after the warm-up share of the run, cut into ``windows`` equal windows,
have floors (least RSS of the window) within ``tolerance`` of the first window's floor. A
sample inside a prefill holds its activations (hundreds of MiB, gone after it), so peaks
are reported beside the floors, but only a leak lifts the floor. Host bytes must never
exceed the host tier's size.
"""

from __future__ import annotations

import itertools
import os
import random
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sgl_kvext.config.values import parse_size
from sgl_kvext.fragments.prewarm_client import prewarm_corpus
from sgl_kvext.harness.server import SGLangServer
from sgl_kvext_bench.client import stream_generate
from sgl_kvext_bench.multiturn import Workload
from sgl_kvext_bench.rag_set import RagSet, RagSpec, prompt_text

PAGE = os.sysconf("SC_PAGE_SIZE")
_RAG = RagSpec(questions=64)


@dataclass(frozen=True)
class SoakSpec:
    minutes: float = 30.0
    sample_s: float = 10.0
    warmup_share: float = 0.2
    host_size: str = "256MiB"
    users: int = 8
    session_turns: int = 6
    answer_tokens: int = 8
    tolerance: float = 0.05
    windows: int = 4


def group_rss(pgid: int) -> dict[str, int]:
    """``{"pid name": resident bytes}`` for every live process in process group ``pgid``."""
    out: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/statm") as f:
                resident = int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue                                   # exited meanwhile
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:]
        if int(fields.split()[2]) == pgid:             # field 5: process group
            out[f"{entry} {name}"] = resident
    return out


def host_used_bytes(url: str) -> int:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("kvext_tier_used_bytes{") and 'tier="host"' in line))


def _traffic(url: str, spec: SoakSpec, rag: RagSet, deadline: float, stop: threading.Event,
             progress: Callable[[str], None], at_rest: Callable[[], None]) -> dict[str, int]:
    chat = Workload(users=spec.users, turns=spec.session_turns, system_words=200,
                    question_words=30, answer_tokens=spec.answer_tokens)
    histories, turns, sessions = [""] * spec.users, [0] * spec.users, [0] * spec.users
    counts = {"requests": 0, "errors": 0, "chat": 0, "rag": 0}
    rng = random.Random(0)
    i = 0
    while time.monotonic() < deadline and not stop.is_set():
        try:
            if i % 2 == 0:
                user = (i // 2) % spec.users
                if turns[user] == spec.session_turns:      # a new session, new KV
                    histories[user], turns[user] = "", 0
                    sessions[user] += 1
                turns[user] += 1
                question = chat.question(user + 1000 * sessions[user], turns[user])
                r = stream_generate(url, chat.system_prompt() + histories[user] + question,
                                    spec.answer_tokens)
                histories[user] += question + r.text + "\n"
                counts["chat"] += 1
            else:
                q = rag.questions[rng.randrange(len(rag.questions))]
                stream_generate(url, prompt_text(rag, q), spec.answer_tokens, custom_params={
                    "kvext_chunks": [rag.documents[d] for d in q.documents]})
                counts["rag"] += 1
        except OSError:
            counts["errors"] += 1
        counts["requests"] += 1
        i += 1
        at_rest()
        progress(f"soak: {counts['requests']} requests, {counts['errors']} errors, "
                 f"{max(0.0, deadline - time.monotonic()) / 60:.1f} min left")
    return counts


def run_soak(model_path: Path, spec: SoakSpec, log_dir: Path,
             progress: Callable[[str], None] = print,
             server_args: tuple[str, ...] = ()) -> dict[str, Any]:
    host_cap = parse_size(spec.host_size)
    samples: list[dict[str, Any]] = []
    rest: list[dict[str, Any]] = []
    rag = _RAG.build()
    with tempfile.TemporaryDirectory(prefix="kvext-soak-") as work:
        args = ("--enable-hierarchical-kv", "--kvext-fragment-blend", "--enable-metrics",
                "--max-total-tokens", "6000", "--kvext-host-size", spec.host_size,
                "--kvext-disk-dir", str(Path(work) / "disk"), "--kvext-disk-size", "2GiB",
                *server_args)
        with SGLangServer(model_path, args, log_path=log_dir / "soak.log") as srv:
            stream_generate(srv.url, "Hello", 1)
            progress("soak: pre-warming the RAG corpus")
            prewarm_corpus(srv.url, list(rag.documents), timeout_s=1800)
            start = time.monotonic()
            deadline = start + spec.minutes * 60
            stop = threading.Event()
            result: dict[str, dict[str, int]] = {}

            def at_rest() -> None:           # one request at a time: the server is idle now
                rest.append({"t_s": round(time.monotonic() - start, 1),
                             "rss": group_rss(srv.pid)})

            worker = threading.Thread(target=lambda: result.update(counts=_traffic(
                srv.url, spec, rag, deadline, stop, progress, at_rest)), daemon=True)
            worker.start()
            try:
                while worker.is_alive():
                    samples.append({"t_s": round(time.monotonic() - start, 1),
                                    "rss": group_rss(srv.pid),
                                    "host_used_bytes": host_used_bytes(srv.url)})
                    worker.join(timeout=spec.sample_s)
            finally:
                stop.set()
                worker.join(timeout=120)
    return summarize(spec, samples, rest, result.get("counts", {}), host_cap)


def summarize(spec: SoakSpec, samples: list[dict[str, Any]], rest: list[dict[str, Any]],
              counts: dict[str, int], host_cap: int) -> dict[str, Any]:
    """Per process after warm-up: the floor (least RSS at rest) of each window, the growth of
    the highest floor over the first, and the peak of the periodic samples."""
    warm_t = spec.warmup_share * spec.minutes * 60
    after = [s for s in samples if s["t_s"] >= warm_t] or samples[-1:]
    rest_after = [s for s in rest if s["t_s"] >= warm_t] or rest[-1:] or after
    processes = []
    for name in sorted({n for s in rest_after for n in s["rss"]}):
        series = [s["rss"][name] for s in rest_after if name in s["rss"]]
        floors = [min(w) for w in _windows(series, spec.windows)]
        peak = max([s["rss"][name] for s in after if name in s["rss"]] + series)
        processes.append({"process": name, "rss_window_floors_bytes": floors,
                          "rss_peak_bytes": peak, "growth": max(floors) / floors[0],
                          "peak_over_floor": peak / floors[0]})
    host_max = max((s["host_used_bytes"] for s in samples), default=0)
    return {"spec": asdict(spec), **counts, "samples": samples, "at_rest": rest,
            "processes": processes, "host_cap_bytes": host_cap,
            "host_used_max_bytes": host_max,
            "rss_flat": all(p["growth"] <= 1 + spec.tolerance for p in processes),
            "host_within_cap": host_max <= host_cap}


def _windows(series: list[int], n: int) -> list[list[int]]:
    """``series`` cut into at most ``n`` consecutive, non-empty, near-equal windows."""
    n = max(1, min(n, len(series)))
    bounds = [round(i * len(series) / n) for i in range(n + 1)]
    return [series[a:b] for a, b in itertools.pairwise(bounds) if b > a]
