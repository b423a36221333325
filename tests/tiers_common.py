"""Shared by the server tier tests (import as ``from tiers_common import ...``): a ~560-token
context asked two ways, filler prompts that push it out of a tiny device pool, the server
flags, and readers for ``/metrics``. float32 throughout (see test_server.py)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import NamedTuple

from server_pool import ServerPool

from sgl_kvext.harness.demo import build_context
from sgl_kvext.harness.seaweedfs import SeaweedFS
from sgl_kvext.harness.server import Completion, SGLangServer

CONTEXT, QUESTIONS = build_context(24, seed=11)          # ~560 tokens
PROMPTS = [CONTEXT + q + "\nAnswer: the depot shipped" for q in QUESTIONS[:2]]
FILLERS = [build_context(45, seed=s)[0] + "Total crates:" for s in (21, 22, 23)]
MAX_NEW = 12
#: ``--kvext-metrics-interval 0.1``: counters reach /metrics within 0.1 s (METRICS_WAIT_S).
BASE = ["--dtype", "float32", "--max-total-tokens", "1400", "--kvext-page-tokens", "32",
        "--enable-hierarchical-kv", "--kvext-metrics-interval", "0.1"]
METRICS_WAIT_S = 2.5     # as with 1 s copies: a CI run failed with 0.6 s (2026-12-05)
FROM_TIER = 400      # tokens the second request must get from a tier (the device keeps ~22)
SMALL_HOST = ["--kvext-host-size", "40MiB"]   # holds the context; fillers push it further down


class Chain(NamedTuple):
    """The session's shared server with every tier: a small host tier, a disk folder and an
    S3 prefix, both also read by the other instances the tests start (``s3_reader``,
    ``disk_reader``)."""

    disk: Path
    s3_prefix: str
    seaweed: SeaweedFS
    events_port: int        # SGLang's KV events (device and tiers) published on loopback

    def args(self) -> list[str]:
        events = {"publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{self.events_port}",
                  "bind": True}
        return [*BASE, "--enable-metrics", *SMALL_HOST, "--kvext-disk-dir", str(self.disk),
                *s3_args(self.seaweed, self.s3_prefix), "--kv-events-config", json.dumps(events)]

    def server(self, pool: ServerPool) -> SGLangServer:
        return pool.get("chain", self.args(), seaweed_env(self.seaweed))

    def s3_reader(self, pool: ServerPool) -> SGLangServer:
        """Another instance sharing only the S3 prefix."""
        return pool.get("s3-reader", [*BASE, *s3_args(self.seaweed, self.s3_prefix)],
                        seaweed_env(self.seaweed))

    def disk_reader(self, pool: ServerPool) -> SGLangServer:
        """Another instance on the same disk folder (a restart, as far as KV goes)."""
        return pool.get("disk-reader", [*BASE, "--kvext-disk-dir", str(self.disk)])


def tier_server(model_path: Path, log_dir: Path, name: str, *args: str,
           env: dict[str, str] | None = None) -> SGLangServer:
    return SGLangServer(model_path, [*BASE, *args], log_path=log_dir / f"{name}.log", env=env)


#: What :func:`evict_context` may send. The first filler pushes the context out of the
#: 1,400-token device pool into the host tier (its ~1,100 new tokens do not fit beside it);
#: the second pushes the first one's 35 pages into the 40 MiB host tier (28 pages), whose
#: least recent are the context's: they leave it (and stay on disk / S3). A page reaches the
#: host tier only when the device evicts it, so one filler never gets the context below host.
EVICTING = FILLERS[:2]


def evict_context(srv: SGLangServer, below_host: bool = False) -> list[tuple[str, Completion]]:
    """:data:`EVICTING` fillers, one after another, with their completions: the context's
    pages leave the device pool, and with ``below_host`` the host tier too."""
    return [(filler, srv.generate(filler, max_new_tokens=2))
            for filler in EVICTING[:2 if below_host else 1]]


def metrics(srv: SGLangServer) -> str:
    """``/metrics`` once the exporter has copied the counters (every 0.1 s: BASE)."""
    time.sleep(METRICS_WAIT_S)
    return srv.get_text("/metrics")


def where(got: Completion) -> str:
    """Where a completion's cached tokens came from: the message of an exactness assertion,
    so a wrong token names the path that served it."""
    return f"cached {got.cached_tokens} of {got.prompt_tokens}: {got.meta.get('kvext_load')}"


def ask(srv: SGLangServer, i: int, salt: str | None = None) -> Completion:
    """Prompt ``i``, greedy, in exact mode (on a server with ``--kvext-fragment-blend`` a
    request is otherwise in the blend namespace, where KV may be approximate and an exactness
    assertion unsound); ``salt`` is the request's ``cache_salt`` (its tenant)."""
    return srv.generate(PROMPTS[i], max_new_tokens=MAX_NEW, cache_salt=salt,
                        custom_params={"kvext_exact": True})


def seaweed_env(seaweed: SeaweedFS) -> dict[str, str]:
    creds = seaweed.credentials
    return {"AWS_ACCESS_KEY_ID": creds["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": creds["aws_secret_access_key"]}


def s3_args(seaweed: SeaweedFS, prefix: str | None = None) -> list[str]:
    return ["--kvext-s3-url", f"s3://kvext-e2e/{prefix or uuid.uuid4().hex}",
            "--kvext-s3-endpoint", seaweed.endpoint]


def tier_args(tier: str, tmp_path: Path, seaweed: SeaweedFS) -> list[str]:
    """Flags that make ``tier`` the one the evicted context comes back from."""
    if tier == "host":
        return ["--kvext-host-size", "512MiB"]
    if tier == "disk":
        return [*SMALL_HOST, "--kvext-disk-dir", str(tmp_path / "disk"), "--kvext-disk-size",
                "1GiB"]
    return [*SMALL_HOST, *s3_args(seaweed)]


def metric(text: str, name: str, tier: str | None = None) -> float:
    """Sum of a /metrics sample over its labels (optionally one tier)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and (tier is None or f'tier="{tier}"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


class KVEvents:
    """A subscriber to a server's KV events (SGLang's ZMQ publisher): the media it heard."""

    def __init__(self, port: int) -> None:
        import zmq

        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.connect(f"tcp://127.0.0.1:{port}")
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.media: set[str] = set()
        time.sleep(1.0)             # ZMQ drops what is published before the subscription lands

    def wait_for(self, srv: SGLangServer, media: set[str], timeout_s: float = 60.0) -> set[str]:
        """Read events until ``media`` were all heard (or the timeout); tier events written on
        tier threads go out with the next batch's, so a one-token request is sent meanwhile."""
        import msgspec
        from sglang.srt.disaggregation.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(KVEventBatch)
        deadline = time.monotonic() + timeout_s
        while not media <= self.media and time.monotonic() < deadline:
            if self._sub.poll(1000):
                payload = self._sub.recv_multipart()[-1]
                self.media.update(str(getattr(e, "medium", None))
                                  for e in decoder.decode(payload).events)
            else:
                srv.generate("Hi", max_new_tokens=1)
        return self.media

    def close(self) -> None:
        self._sub.close(0)
        self._ctx.term()
