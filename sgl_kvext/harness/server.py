"""Start, query and stop a real SGLang server as a child process, on loopback only.

Used by the demo, the tests and the benchmarks. The server runs in its own process group, so
:meth:`SGLangServer.stop` ends it and every process it spawned (scheduler, detokenizer) by id.
This module runs SGLang as a subprocess and never imports it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

HOST = "127.0.0.1"
#: SGLang flags for its CPU engine; used when torch sees no CUDA device. ``kvext_cpu`` is
#: sgl-kvext's prefix-aware CPU attention (``torch_native`` recomputes a cached prefix).
#: ``--sleep-on-idle``: an idle scheduler otherwise spins in Python, holding one of two cores
#: and the GIL its own background threads (fragment registration, tier flushes) need.
#: ``--disable-overlap-schedule``: on a CPU nothing runs beside the forward, so SGLang's
#: overlap loop only delays each result by one more forward: the first token streamed after
#: the first decode step (measured 2026-12-04, 4k cached tokens: TTFT 0.167 -> 0.095 s with
#: one new token, 0.227 -> 0.161 s with ~55; radix and hierarchical alike).
CPU_FLAGS = ("--device", "cpu", "--attention-backend", "kvext_cpu",
             "--sampling-backend", "pytorch", "--disable-cuda-graph", "--sleep-on-idle",
             "--disable-overlap-schedule")

#: SGLang treats a SIGTERM'd scheduler as a crash: it sleeps 5 s "to let GPU activity
#: settle" and runs py-spy on the schedulers before exiting. A harness stop is no crash; the
#: caller's environment can still turn the diagnostics back on.
QUIET_STOP_ENV = {"SGLANG_PYSPY_DUMP_BEFORE_CRASH": "0", "SGLANG_CUDA_COREDUMP_BEFORE_CRASH": "0"}

#: The two user-facing entry points, taken from this interpreter's environment.
LAUNCHERS = {"launch_server": (sys.executable, "-m", "sglang.launch_server"),
             "serve": (str(Path(sys.executable).parent / "sglang"), "serve")}


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time; the message ends with its log."""


class Completion(NamedTuple):
    """One /generate answer: the text, its token ids, the request's wall time and the
    response's whole ``meta_info``."""

    text: str
    output_ids: list[int]
    cached_tokens: int
    prompt_tokens: int
    seconds: float
    meta: dict[str, Any]


def device_flags() -> tuple[str, ...]:
    """SGLang flags that pick the device: the CPU engine when no CUDA device is present."""
    import torch

    return () if torch.cuda.is_available() else CPU_FLAGS


#: CPU flags of bf16 matrix instructions. Without them torch emulates bf16 matmul: measured
#: 5x slower than float32 on the AVX2-only EPYC CI machines (2,266-token prefill of SmolLM2:
#: 27 s bf16, 5.3 s float32).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def fast_cpu_dtype(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """``bfloat16`` when the CPU has bf16 matrix instructions, else ``float32``."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "float32"
    flags = {f for line in text.splitlines() if line.startswith("flags")
             for f in line.partition(":")[2].split()}
    return "bfloat16" if flags & BF16_CPU_FLAGS else "float32"


def dtype_flags(args: Sequence[str]) -> tuple[str, ...]:
    """``--dtype`` for a CPU server whose ``args`` pick none: the CPU's fast dtype (the
    checkpoint's bf16 is emulated, ~5x slower, on CPUs without bf16 matrix instructions).
    Empty on CUDA or when ``args`` already hold a ``--dtype``."""
    if not device_flags() or any(a == "--dtype" or a.startswith("--dtype=") for a in args):
        return ()
    return ("--dtype", fast_cpu_dtype())


#: Where :func:`free_port` looks: below SGLang's own picks (22000-29999, for ports its
#: children bind later) and the kernel's ephemeral range (32768+, where ``bind(0)`` and
#: outgoing connections take theirs). A ``bind(0)`` port is free only until the next
#: ``bind(0)``: on 2026-12-05 a server's scheduler bound the harness's HTTP port (an ephemeral
#: one) before uvicorn did, and the start hung.
PORT_RANGE = range(12000, 22000)
_handed: set[int] = set()     # never the same port twice in one process (binds come later)
#: How often :meth:`SGLangServer.start` tries another port.
PORT_TRIES = 3


def free_port(attempts: int = 256) -> int:
    """A loopback TCP port from :data:`PORT_RANGE` that nothing listens on now and this
    process has not handed out before."""
    for port in random.sample(PORT_RANGE, attempts):
        if port in _handed:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        _handed.add(port)
        return port
    raise RuntimeError(f"no free port in {PORT_RANGE.start}-{PORT_RANGE.stop - 1} after "
                       f"{attempts} tries")


class Endpoint:
    """An SGLang HTTP address (a server, or a router in front of several): JSON requests."""

    def __init__(self, url: str) -> None:
        self.url = url

    def post(self, path: str, payload: dict[str, Any], timeout_s: float = 300.0) -> Any:
        """POST JSON; the answer parsed as JSON when it says so, else its text."""
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return _body(resp)

    def flush_cache(self, timeout_s: float = 60.0) -> None:
        """Empty the radix tree once the scheduler is idle: a request whose answer came back
        can still hold its slot for a scheduler pass, and a bare ``/flush_cache`` then
        answers 400. SGLang's own ``timeout`` defers the flush up to ``timeout_s``."""
        self.post(f"/flush_cache?timeout={timeout_s:g}", {}, timeout_s=timeout_s + 30.0)

    def get(self, path: str, timeout_s: float = 30.0) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout_s) as resp:
            return _body(resp)

    def get_text(self, path: str, timeout_s: float = 30.0) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout_s) as resp:
            return str(resp.read().decode(errors="replace"))

    def generate(self, prompt: str | list[int], max_new_tokens: int = 16,
                 timeout_s: float = 300.0,
                 custom_params: dict[str, Any] | None = None,
                 cache_salt: str | None = None) -> Completion:
        """Greedy completion of ``prompt`` (text or token ids); ``custom_params`` go into the
        sampling parameters (e.g. sgl-kvext's ``kvext_exact``); ``cache_salt`` is the
        request's tenant (SGLang keeps salted KV apart)."""
        key = "text" if isinstance(prompt, str) else "input_ids"
        sampling: dict[str, Any] = {"temperature": 0.0, "max_new_tokens": max_new_tokens}
        if custom_params:
            sampling["custom_params"] = custom_params
        payload: dict[str, Any] = {key: prompt, "sampling_params": sampling}
        if cache_salt is not None:
            payload["cache_salt"] = cache_salt
        start = time.perf_counter()
        out = self.post("/generate", payload, timeout_s)
        seconds = time.perf_counter() - start
        meta = out.get("meta_info", {})
        return Completion(out["text"], list(out.get("output_ids", [])),
                          int(meta.get("cached_tokens", 0)), int(meta.get("prompt_tokens", 0)),
                          seconds, meta)


class SGLangServer(Endpoint):
    """A ``python -m sglang.launch_server`` child on 127.0.0.1.

    Parameters
    ----------
    model_path
        Checkpoint folder.
    args
        Extra server flags, e.g. ``["--enable-hierarchical-kv"]``.
    log_path
        File for the server's stdout and stderr.
    startup_timeout_s
        How long :meth:`start` waits for ``/health``.
    launcher
        ``"launch_server"`` (``python -m sglang.launch_server``) or ``"serve"`` (``sglang serve``).
    """

    def __init__(self, model_path: Path, args: Sequence[str] = (), *, log_path: Path,
                 env: dict[str, str] | None = None, startup_timeout_s: float = 600.0,
                 launcher: str = "launch_server") -> None:
        if launcher not in LAUNCHERS:
            raise ValueError(f"launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}")
        self.port = free_port()
        super().__init__(f"http://{HOST}:{self.port}")
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self._cmd = [*LAUNCHERS[launcher], "--model-path", str(model_path),
                     "--host", HOST, "--port", str(self.port), *device_flags(), *args]
        self._env = {**QUIET_STOP_ENV, **os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self._proc: subprocess.Popen[bytes] | None = None
        self._starts = 0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> SGLangServer:
        """Start the server and wait for ``/health``. The first start truncates the log; a
        restart appends to it after a marker line (a killed run's log is kept). A server whose
        HTTP port another process bound first is started again on another port, at most
        :data:`PORT_TRIES` times (it does not exit by itself: it would hang to the timeout)."""
        for _ in range(PORT_TRIES):
            if self._launch():
                return self
            self.port = free_port()
            self.url = f"http://{HOST}:{self.port}"
            self._cmd[self._cmd.index("--port") + 1] = str(self.port)
        raise ServerStartError(f"SGLang server found its HTTP port taken {PORT_TRIES} times"
                               f"\n{self.log_tail()}")

    def _launch(self) -> bool:
        """One start: True once healthy, False (stopped again) if its HTTP port was taken."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._starts += 1
        with open(self.log_path, "wb" if self._starts == 1 else "ab") as log:
            if self._starts > 1:
                log.write(f"--- sgl-kvext: server start {self._starts} ---\n".encode())
                log.flush()
            offset = log.tell()
            self._proc = subprocess.Popen(self._cmd, stdout=log, stderr=subprocess.STDOUT,
                                          env=self._env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        proc = self._proc
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise ServerStartError(f"SGLang server exited with code {proc.returncode}"
                                           f"\n{self.log_tail()}")
                if self._healthy():
                    return True
                if self._port_taken(offset):
                    self.stop()
                    return False
                time.sleep(0.25)     # a refused /health costs nothing; starts end sooner
        except BaseException:
            # Also on SIGTERM / Ctrl-C while waiting: __exit__ never runs for a failed start.
            self.stop()
            raise
        self.stop()
        raise ServerStartError(f"SGLang server not healthy after {self.startup_timeout_s:.0f} s"
                               f"\n{self.log_tail()}")

    def _port_taken(self, offset: int) -> bool:
        """Whether this start's log says its HTTP port was in use (uvicorn's bind error)."""
        taken = f"error while attempting to bind on address ('{HOST}', {self.port})".encode()
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return taken in log.read()
        except OSError:
            return False

    def stop(self, grace_s: float = 30.0) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL after ``grace_s``)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                # Children may outlive the leader briefly; make sure the group is gone.
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
            break

    @property
    def pid(self) -> int:
        """The server's process id, also its process group (every SGLang child is in it)."""
        if self._proc is None:
            raise RuntimeError("the server is not running")
        return self._proc.pid

    def kill(self) -> None:
        """SIGKILL the whole server (a crash, for fault tests); :meth:`stop` then reaps it."""
        if self._proc is not None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> SGLangServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    # -------------------------------------------------------------- requests
    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False


def _body(resp: Any) -> Any:
    raw = resp.read()
    if "json" in resp.headers.get("Content-Type", ""):
        return json.loads(raw)
    return raw.decode(errors="replace")
