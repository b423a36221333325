"""A fleet on one machine: N SGLang servers sharing one S3 prefix behind SGLang's router.

For tests, benchmarks and users trying it out. Every process listens on loopback only and
runs in its own process group; :meth:`Fleet.stop` ends the router, then every server, by
process id. On several machines the same fleet is each server started with the same
``--kvext-s3-url`` (and model, page size, codec, TP size) and the router given their URLs
(docs/fleet.md).

The router is SGLang's own, ``sglang-router`` from PyPI (``python -m
sglang_router.launch_router``): a Rust binary wheel that runs on CPU. Its successor ``smg``
does the same job with a larger surface; the one SGLang's own docs launch is the one used.
Like :mod:`.server`, this module runs SGLang as subprocesses and never imports it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from sgl_kvext.harness.server import HOST, Endpoint, ServerStartError, SGLangServer, free_port
from sgl_kvext.harness.tier_router import TierAwareRouter

ROUTER = (sys.executable, "-m", "sglang_router.launch_router")
#: The router's own policies, and ``tier_aware``: :mod:`.tier_router` in its place.
POLICIES = ("round_robin", "cache_aware", "random", "power_of_two", "tier_aware")


class Fleet:
    """``n`` servers started with the same ``args`` (give them one ``--kvext-s3-url``) and
    SGLang's router in front with ``policy``.

    Parameters
    ----------
    model_path
        Checkpoint every server serves.
    n
        Servers, at least 1.
    args
        SGLang / sgl-kvext flags for every server (ports are chosen here).
    log_dir
        Gets ``server-<i>.log`` and ``router.log``.
    policy
        The router's ``--policy``, or ``tier_aware`` for :class:`.TierAwareRouter` (the
        servers' ``/kvext/lookup`` decides) in place of SGLang's router.
    env
        Extra environment for the servers (e.g. S3 credentials).
    health_interval_s
        How often the router checks each server; a dead one is marked down after 2 misses.
    """

    def __init__(self, model_path: Path, n: int, args: Sequence[str], *, log_dir: Path,
                 policy: str = "cache_aware", env: dict[str, str] | None = None,
                 health_interval_s: int = 1, start_timeout_s: float = 600.0) -> None:
        if n < 1:
            raise ValueError(f"a fleet needs at least 1 server, got {n}")
        if policy not in POLICIES:
            raise ValueError(f"router policy {policy!r}: allowed {', '.join(POLICIES)}")
        self.log_dir = Path(log_dir)
        self.policy, self.health_interval_s = policy, health_interval_s
        self.start_timeout_s = start_timeout_s
        self.servers = [SGLangServer(model_path, args, log_path=self.log_dir / f"server-{i}.log",
                                     env=env, startup_timeout_s=start_timeout_s)
                        for i in range(n)]
        self.port = free_port()
        #: The router: what clients talk to (``generate``, ``post``, ...).
        self.router = Endpoint(f"http://{HOST}:{self.port}")
        self._router: subprocess.Popen[bytes] | None = None
        self._tier_router: TierAwareRouter | None = None

    @property
    def url(self) -> str:
        return self.router.url

    def start(self) -> Fleet:
        """Start the servers (together), then the router; stop everything on a failure."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            with ThreadPoolExecutor(len(self.servers)) as pool:
                for started in [pool.submit(s.start) for s in self.servers]:
                    started.result()
            self._start_router()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_router(self) -> None:
        if self.policy == "tier_aware":
            self._tier_router = TierAwareRouter([s.url for s in self.servers], self.port,
                                                host=HOST).start()
            return
        cmd = [*ROUTER, "--host", HOST, "--port", str(self.port), "--policy", self.policy,
               "--worker-urls", *(s.url for s in self.servers),
               "--health-check-interval-secs", str(self.health_interval_s),
               "--health-failure-threshold", "2", "--prometheus-host", HOST,
               "--prometheus-port", str(free_port())]
        with open(self.log_dir / "router.log", "ab") as log:
            self._router = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._router.poll() is not None:
                raise ServerStartError(f"router exited with {self._router.returncode}:\n"
                                       f"{self.router_log_tail()}")
            if self.healthy_workers() == len(self.servers):
                return
            time.sleep(0.5)
        raise ServerStartError(f"router did not see {len(self.servers)} healthy servers within "
                               f"{self.start_timeout_s:.0f}s:\n{self.router_log_tail()}")

    def restart_router(self) -> None:
        """Stop the router and start it again on its port: the servers keep their KV, the
        router's own state (``cache_aware``'s text-prefix tree) starts empty."""
        self._stop_router()
        self._start_router()

    def healthy_workers(self) -> int:
        """Servers the router routes to now (its ``/readiness``; 0 while it cannot answer).
        It registers them in the background after start, and marks one down after two failed
        health checks. With ``tier_aware``: the servers answering ``/health``."""
        if self._tier_router is not None:
            return self._tier_router.healthy_workers()
        try:
            with urllib.request.urlopen(self.url + "/readiness", timeout=5) as resp:
                return int(json.loads(resp.read()).get("healthy_workers", 0))
        except (urllib.error.URLError, OSError, ValueError):
            return 0

    def stop(self) -> None:
        """The router first (no new requests), then every server; by process group id."""
        self._stop_router()
        for server in self.servers:
            server.stop()

    def _stop_router(self) -> None:
        router, self._router = self._router, None
        tier_router, self._tier_router = self._tier_router, None
        if tier_router is not None:
            tier_router.stop()
        if router is not None and router.poll() is None:
            try:
                os.killpg(router.pid, signal.SIGTERM)
                router.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(router.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                router.wait(timeout=15)

    def router_log_tail(self, lines: int = 30) -> str:
        path = self.log_dir / "router.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
