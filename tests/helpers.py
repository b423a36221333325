"""Helpers shared by tests (import as ``from helpers import ...``)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, *, env: dict[str, str] | None = None, cwd: Path | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (clean sys.modules, own environment)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, cwd=cwd or ROOT, timeout=timeout)


def bench_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``sgl-kvext-bench ARGS`` (as ``python -m sgl_kvext_bench.cli``), output captured."""
    return subprocess.run([sys.executable, "-m", "sgl_kvext_bench.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def remote_disk_fake(root: Path, capacity: int, namespace: bytes):  # type: ignore[no-untyped-def]
    """A disk tier that reports itself remote, as S3 does: a lower tier the scheduler never
    reads directly (unit tests run without the network S3 needs)."""
    from sgl_kvext.tiers.base import TierCapabilities
    from sgl_kvext.tiers.disk import DiskTier

    class RemoteDiskFake(DiskTier):
        @property
        def capabilities(self) -> TierCapabilities:
            return TierCapabilities(persistent=True, shared=True, local=False)

    return RemoteDiskFake(root, capacity, namespace, codec="none")


def disk_bytes_now(root: Path) -> int:
    """The bytes of a disk-tier folder's object files at one instant (0 before it exists).

    Counted under the folder's ledger lock, so no process evicts a file while the walk runs:
    a walk racing evictions can count a victim and its replacement both (2% over the cap in a
    CI run on 2026-12-06). Files written during the walk had their bytes reserved before, so
    they are within the cap anyway.
    """
    from sgl_kvext.tiers.disk_ledger import scan_objects

    if not (root / ".lock").exists():
        return 0
    fd = os.open(root / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return sum(f.size for f in scan_objects(root / "objects"))
    finally:
        os.close(fd)                         # also drops the lock
