"""The scheduler's longest stall under hostile load (``sgl-kvext-bench stall``).

One hierarchical server with every tier (host memory, disk, S3 on a SeaweedFS the bench
starts) and fragment blend. A probe client streams greedy completions back to back, and
every gap between two of its tokens is recorded, while one load at a time runs beside it:

- ``idle``: nothing (the probe's own decode: the reference for the refused loads);
- ``prewarm_body_20mib``: a 20 MiB ``/kvext/prewarm`` body (refused before it is read);
- ``prewarm_oversized``: a text longer than the model's context and 350k tokens in one
  request (both refused after the HTTP side tokenized them);
- ``chunks_1024x100k``: a generate request with 1,024 ``kvext_chunks`` of 100k characters
  (a 100 MB body: refused unparsed, ``--kvext-max-request-bytes``);
- ``prewarm_registration``: a 16-document corpus registered (computed at the lowest CPU
  priority on the scheduler's worker thread, written through every tier);
- ``blend_requests``: three prompts that each mark four pre-warmed ~300-token documents
  (``kvext_chunks``, in a new order each time): blended prefills beside the probe;
- ``traffic`` and ``traffic_s3_late``: requests of the same shape (new prompts that push
  earlier ones down the tiers, then some of those again), with S3 answering, then with S3
  frozen (SIGSTOP: every call waits out its timeout), which also fills the S3 writer queue.

A token gap is decode plus whatever ran in between; the stall a load adds is its longest gap
minus the longest gap of its reference (``idle``, or ``traffic`` for ``traffic_s3_late``:
prefills of other requests are compute the probe shares by design). Gaps are taken at the
client on loopback, medians over ``repeats``: they show every scheduler wait, and also what
is not the scheduler's (the HTTP process parsing a huge body, CPU shared with a registration
on a 2-core machine).
"""

from __future__ import annotations

import http.client
import json
import random
import statistics
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sgl_kvext.fragments.prewarm_client import prewarm_corpus
from sgl_kvext.harness.seaweedfs import SeaweedFS
from sgl_kvext.harness.server import SGLangServer
from sgl_kvext_bench.client import stream_generate

PROBE = "Write a long story about a lighthouse keeper and the ships she watched. Once upon"
PROBE_TOKENS = 48
WORDS = ("river", "stone", "lamp", "orbit", "cedar", "quartz", "harbor", "violet", "engine",
         "meadow", "copper", "signal", "lantern", "glacier", "saddle", "thunder")
#: Every load, in the order they run.
LOADS = ("idle", "prewarm_body_20mib", "prewarm_oversized", "chunks_1024x100k",
         "prewarm_registration", "blend_requests", "traffic", "traffic_s3_late")
#: Each load's reference: ``idle`` unless named here; ``traffic`` is a reference itself (its
#: gaps are other requests' prefills, compute the probe shares by design).
REFERENCE: dict[str, str | None] = {"traffic_s3_late": "traffic", "traffic": None}


def _words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(100)) for _ in range(n)) + "."


def _status(url: str, body: bytes, timeout_s: float = 600.0) -> int:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def post_huge_body(base_url: str, nbytes: int, path: str = "/kvext/prewarm") -> int:
    """Status of a ``nbytes`` POST to ``path``; the server may answer and close before the
    body is all sent (then the rest is not sent)."""
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(nbytes))
        conn.endheaders()
        try:
            for _ in range(nbytes >> 20):
                conn.send(b"x" * (1 << 20))
        except (BrokenPipeError, ConnectionResetError):
            pass
        return conn.getresponse().status
    finally:
        conn.close()


class _Loads:
    """The loads, each a call that returns what the server answered."""

    def __init__(self, url: str, weed: SeaweedFS, seed: int) -> None:
        self.url, self.weed, self.rng = url, weed, random.Random(seed)
        self.round = 0
        self._docs: list[str] = []
        # Hostile bodies are built once, before any measurement: building 100 MB of JSON
        # takes the client's CPU, which on a shared 2-core machine would slow the server.
        self._long_text = json.dumps({"texts": [_words(9000, self.rng)]}).encode()
        self._many = json.dumps({"texts": [_words(600, self.rng) for _ in range(200)]}).encode()
        chunk = _words(100_000 // 9, self.rng)[:100_000]
        self._chunks = json.dumps({"text": "Say hello.", "sampling_params": {
            "max_new_tokens": 1, "custom_params": {"kvext_chunks": [chunk] * 1024}}}).encode()

    def blend_documents(self) -> list[str]:
        """The documents ``blend_requests`` marks, pre-warmed once (before any measurement)."""
        if not self._docs:
            self._docs = [_words(120, random.Random(1000 + i)) for i in range(4)]
            prewarm_corpus(self.url, self._docs, timeout_s=600)
        return self._docs

    def blend_requests(self) -> dict[str, Any]:
        docs = self.blend_documents()
        blended = 0
        for _ in range(3):
            order = self.rng.sample(docs, len(docs))
            text = ("Notes follow.\n" + "\n".join(order)
                    + "\nWhich word comes first in the notes?")
            out = stream_generate(self.url, text, 2, custom_params={"kvext_chunks": order})
            blended += out.cached_tokens
        return {"requests": 3, "cached_tokens": blended}

    def idle(self) -> dict[str, Any]:
        time.sleep(3.0)
        return {}

    def prewarm_body_20mib(self) -> dict[str, Any]:
        return {"status": post_huge_body(self.url, 20 << 20)}

    def prewarm_oversized(self) -> dict[str, Any]:
        url = self.url + "/kvext/prewarm"
        return {"status": [_status(url, self._long_text), _status(url, self._many)]}

    def chunks_1024x100k(self) -> dict[str, Any]:
        return {"status": _status(self.url + "/generate", self._chunks)}

    def prewarm_registration(self) -> dict[str, Any]:
        docs = [_words(220, self.rng) for _ in range(16)]
        return {"fragments": prewarm_corpus(self.url, docs, timeout_s=600).fragments}

    def traffic(self, seed: int | None = None) -> dict[str, Any]:
        """Eight new ~700-token prompts (the pool holds ~5), then the first four again (from
        the tiers). Each call sends new prompts of the same sizes."""
        self.round += 1
        rng = random.Random(seed if seed is not None else 2 * self.round)
        prompts = [_words(350, rng) for _ in range(8)]
        cached = 0
        for text in prompts + prompts[:4]:
            cached += stream_generate(self.url, text, 2).cached_tokens
        return {"requests": 12, "cached_tokens": cached}

    def traffic_s3_late(self) -> dict[str, Any]:
        """:meth:`traffic` (other prompts, the same sizes) with S3 frozen: its writes and
        reads wait out their timeout on the tier's own threads."""
        self.weed.pause()
        try:
            return self.traffic(seed=2 * self.round + 1)
        finally:
            self.weed.resume()


def _probe(url: str, stop: threading.Event, gaps: list[float]) -> None:
    while not stop.is_set():
        gaps.extend(stream_generate(url, PROBE, PROBE_TOKENS).itl_s)


def scheduler_gaps(url: str, reset: bool = False) -> dict[str, Any]:
    """The server's own window of scheduler passes (``POST /kvext/scheduler``)."""
    body = json.dumps({"reset": reset}).encode()
    req = urllib.request.Request(url + "/kvext/scheduler", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return dict(json.loads(resp.read()))


def _measure(url: str, load: Callable[[], dict[str, Any]]
             ) -> tuple[list[float], dict[str, Any], dict[str, Any]]:
    stop, gaps = threading.Event(), list[float]()
    probe = threading.Thread(target=_probe, args=(url, stop, gaps), daemon=True)
    probe.start()
    time.sleep(0.5)                                  # the probe is decoding
    scheduler_gaps(url, reset=True)
    try:
        answer = load()
    finally:
        time.sleep(0.5)
        server_side = scheduler_gaps(url)
        stop.set()
        probe.join(timeout=300)
    return gaps, answer, server_side


def run_stall(model_path: Path, log_dir: Path, progress: Callable[[str], None] = print,
              server_args: tuple[str, ...] = (), repeats: int = 3,
              loads: tuple[str, ...] = LOADS,
              seed: int = 0) -> dict[str, Any]:
    """Every load ``repeats`` times beside the probe (see the module doc)."""
    if "traffic_s3_late" in loads and "traffic" not in loads:
        raise ValueError("traffic_s3_late is measured against traffic: run both")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in loads}
    with tempfile.TemporaryDirectory(prefix="kvext-stall-") as work, \
            SeaweedFS(Path(work) / "weed", log_path=log_dir / "stall-weed.log") as weed:
        creds = weed.credentials
        env = {"AWS_ACCESS_KEY_ID": creds["aws_access_key_id"],
               "AWS_SECRET_ACCESS_KEY": creds["aws_secret_access_key"]}
        args = ("--enable-hierarchical-kv", "--kvext-fragment-blend", "--enable-metrics",
                "--max-total-tokens", "4096", "--kvext-host-size", "16MiB",
                "--kvext-disk-dir", str(Path(work) / "disk"), "--kvext-disk-size", "1GiB",
                "--kvext-s3-url", f"s3://kvext-bench/stall-{uuid.uuid4().hex}",
                "--kvext-s3-endpoint", weed.endpoint, "--kvext-s3-timeout", "4",
                *server_args)
        with SGLangServer(model_path, args, log_path=log_dir / "stall.log", env=env) as srv:
            stream_generate(srv.url, PROBE, PROBE_TOKENS)                  # warm-up
            acts = _Loads(srv.url, weed, seed)
            if "blend_requests" in loads:
                acts.blend_documents()
            for r in range(repeats):
                for name in loads:
                    started = time.perf_counter()
                    gaps, answer, server_side = _measure(srv.url, getattr(acts, name))
                    runs[name].append({"max_gap_s": max(gaps, default=0.0),
                                       "p50_gap_s": statistics.median(gaps) if gaps else 0.0,
                                       "gaps": len(gaps), "answer": answer,
                                       "scheduler": server_side,
                                       "seconds": time.perf_counter() - started})
                    progress(f"stall: round {r + 1}/{repeats} {name}: longest token gap "
                             f"{runs[name][-1]['max_gap_s'] * 1e3:.0f} ms, scheduler gap "
                             f"{server_side['longest_gap_s'] * 1e3:.0f} ms (CPU "
                             f"{server_side['longest_gap_cpu_s'] * 1e3:.0f} ms, waiting for a "
                             f"core {server_side['longest_gap_runq_s'] * 1e3:.0f} ms), forward "
                             f"{server_side['longest_forward_s'] * 1e3:.0f} ms, GC "
                             f"{server_side.get('longest_gc_s', 0.0) * 1e3:.0f} ms")
    return summarize(runs)


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per load: medians over the repeats, and the stall beyond its reference's longest gap."""
    rows: dict[str, dict[str, Any]] = {}
    for name, got in runs.items():
        rows[name] = {"max_gap_s": statistics.median(g["max_gap_s"] for g in got),
                      "p50_gap_s": statistics.median(g["p50_gap_s"] for g in got),
                      "scheduler_gap_s": max(g["scheduler"]["longest_gap_s"] for g in got),
                      "scheduler_forward_s": max(g["scheduler"]["longest_forward_s"]
                                                 for g in got),
                      "scheduler_gc_s": max(g["scheduler"].get("longest_gc_s", 0.0)
                                            for g in got),
                      "runs": got}
    for name, row in rows.items():
        ref = REFERENCE.get(name, "idle")
        row["reference"] = ref if ref is not None and name != ref and ref in rows else None
        row["stall_s"] = (max(0.0, row["max_gap_s"] - rows[row["reference"]]["max_gap_s"])
                          if row["reference"] else None)
    return {"loads": rows,
            "max_stall_s": max((r["stall_s"] for r in rows.values()
                                if r["stall_s"] is not None), default=None),
            "max_scheduler_gap_s": max((r["scheduler_gap_s"] for r in rows.values()),
                                       default=None)}
