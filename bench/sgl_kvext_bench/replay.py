"""Replay a JSONL trace against server configurations (or a running server), open loop.

A trace line is one request::

    {"arrival_s": 0.0, "prompt": "...", "output_tokens": 16}
    {"arrival_s": 1.5, "input_ids": [1, 2, 3], "output_tokens": 8, "chunks": ["..."]}

``arrival_s`` (>= 0, seconds from the start), exactly one of ``prompt`` (text) or ``input_ids``
(token ids), ``output_tokens`` (>= 1), and optionally ``chunks`` (texts the request marks for
fragment reuse, sent as ``kvext_chunks``). Each request is sent at its arrival time whether or
not earlier ones have finished, and streamed: TTFT, inter-token latency, cached tokens.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from sgl_kvext_bench.client import Endpoint, Timed
from sgl_kvext_bench.configs import CONFIGS
from sgl_kvext_bench.serving import Serving


class TraceRequest(NamedTuple):
    """One request of a trace."""

    arrival_s: float
    prompt: str | list[int]
    output_tokens: int
    chunks: tuple[str, ...] = ()


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message names the line and the field."""


def _request(line_no: int, raw: dict[str, Any]) -> TraceRequest:
    def bad(what: str) -> TraceError:
        return TraceError(f"trace line {line_no}: {what}")

    arrival = raw.get("arrival_s", 0.0)
    if isinstance(arrival, bool) or not isinstance(arrival, int | float) or arrival < 0:
        raise bad(f"arrival_s must be a number >= 0, got {arrival!r}")
    has_text, has_ids = "prompt" in raw, "input_ids" in raw
    if has_text == has_ids:
        raise bad("needs exactly one of prompt (text) and input_ids (token ids)")
    prompt = raw["prompt"] if has_text else raw["input_ids"]
    if has_text and (not isinstance(prompt, str) or not prompt):
        raise bad("prompt must be a non-empty string")
    if has_ids and (not isinstance(prompt, list) or not prompt or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)):
        raise bad("input_ids must be a non-empty list of token ids (ints >= 0)")
    out = raw.get("output_tokens")
    if isinstance(out, bool) or not isinstance(out, int) or out < 1:
        raise bad(f"output_tokens must be an integer >= 1, got {out!r}")
    chunks = raw.get("chunks", [])
    if not isinstance(chunks, list) or not all(isinstance(c, str) and c for c in chunks):
        raise bad("chunks must be a list of non-empty strings")
    unknown = set(raw) - {"arrival_s", "prompt", "input_ids", "output_tokens", "chunks", "id"}
    if unknown:
        raise bad(f"unknown field(s) {sorted(unknown)}; allowed: arrival_s, prompt, input_ids, "
                  "output_tokens, chunks, id")
    return TraceRequest(float(arrival), prompt, out, tuple(chunks))


def load_trace(path: Path) -> list[TraceRequest]:
    """The requests of a JSONL trace, in arrival order; :class:`TraceError` when malformed."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror}") from None
    requests = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"trace line {n}: not JSON ({exc.msg})") from None
        if not isinstance(raw, dict):
            raise TraceError(f"trace line {n}: must be a JSON object")
        requests.append(_request(n, raw))
    if not requests:
        raise TraceError(f"trace {path} holds no request")
    return sorted(requests, key=lambda r: r.arrival_s)


def write_trace(requests: Sequence[TraceRequest], path: Path) -> Path:
    """Write ``requests`` as a JSONL trace that :func:`load_trace` reads back."""
    with path.open("w") as f:
        for r in requests:
            line: dict[str, Any] = {"arrival_s": r.arrival_s, "output_tokens": r.output_tokens}
            line["prompt" if isinstance(r.prompt, str) else "input_ids"] = r.prompt
            if r.chunks:
                line["chunks"] = list(r.chunks)
            f.write(json.dumps(line) + "\n")
    return path


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def replay(target: Endpoint, requests: Sequence[TraceRequest], speed: float = 1.0,
           timeout_s: float = 600.0, progress: Callable[[str], None] = print
           ) -> dict[str, Any]:
    """Send every request at ``arrival_s / speed`` and summarize the streamed answers."""
    start = time.perf_counter()
    lock = threading.Lock()
    done = [0]

    def send(r: TraceRequest) -> Timed | str:
        delay = r.arrival_s / speed - (time.perf_counter() - start)
        if delay > 0:
            time.sleep(delay)
        custom = {"kvext_chunks": list(r.chunks)} if r.chunks else None
        try:
            result: Timed | str = target.generate(r.prompt, r.output_tokens, timeout_s,
                                                  custom_params=custom)
        except Exception as exc:            # counted, not fatal: the replay goes on
            result = f"{type(exc).__name__}: {exc}"
        with lock:
            done[0] += 1
            progress(f"replay: {done[0]}/{len(requests)}")
        return result

    with ThreadPoolExecutor(max_workers=min(64, len(requests))) as pool:
        results = list(pool.map(send, requests))
    wall = time.perf_counter() - start
    ok = [r for r in results if isinstance(r, Timed)]
    errors = [r for r in results if isinstance(r, str)]
    summary: dict[str, Any] = {"requests": len(requests), "errors": len(errors),
                               "error_samples": errors[:3], "wall_s": wall}
    if ok:
        ttft = [r.ttft_s for r in ok]
        itl = [g for r in ok for g in r.itl_s]
        summary.update(
            ttft_p50_s=statistics.median(ttft), ttft_p90_s=_pct(ttft, 0.9),
            ttft_p99_s=_pct(ttft, 0.99), itl_p50_s=statistics.median(itl) if itl else None,
            output_tokens_per_s=sum(r.completion_tokens for r in ok) / wall,
            cached_token_share=sum(r.cached_tokens for r in ok)
            / max(1, sum(r.prompt_tokens for r in ok)),
            per_request=[{"ttft_s": r.ttft_s, "prompt_tokens": r.prompt_tokens,
                          "cached_tokens": r.cached_tokens} for r in ok])
    return summary


def run_replay(serving: Serving, configs: Sequence[str], requests: Sequence[TraceRequest],
               speed: float, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Replay against each configuration (``configs.CONFIGS``) in turn, or the running server."""

    results: dict[str, Any] = {"requests": len(requests), "speed": speed, "configs": []}
    for name in serving.configs(configs):
        with serving.serve("replay", name, CONFIGS.get(name, ())) as target:
            results["configs"].append({"name": name, **({"url": target.url} if serving.url
                                                        else {}),
                                       **replay(target, requests, speed, progress=progress)})
    return results
