"""The byte count of a disk-tier folder, shared by every process that uses it.

The count lives in ``ROOT/.usage`` and changes only under an exclusive ``flock`` on
``ROOT/.lock``. A writer *reserves* its object's bytes before writing, so the count always
covers files plus writes in flight, and no interleaving of processes takes the folder past
its cap. When a reservation does not fit, the oldest files (by mtime, which reads refresh:
LRU across processes) are removed until the count is at the low watermark.

A process that crashes after reserving leaves the count too high (space unused, never
overrun; a write that cannot fit even after evicting every file is refused); the next process
to open the folder alone (checked with an exclusive lock on
``ROOT/.alive``, which every open tier holds shared) recomputes it from the files.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

SUFFIX = ".kvx"


class FileInfo(NamedTuple):
    mtime_ns: int
    size: int
    path: Path


def scan_objects(objects_root: Path) -> list[FileInfo]:
    """Every object file under ``objects_root``, oldest first."""
    found: list[FileInfo] = []
    stack = [objects_root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif entry.name.endswith(SUFFIX):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                found.append(FileInfo(st.st_mtime_ns, st.st_size, Path(entry.path)))
    found.sort()
    return found


class DiskLedger:
    """Cross-process byte accounting and eviction for one folder.

    Parameters
    ----------
    root
        The folder (created if missing).
    capacity_bytes
        Cap on the bytes of all object files under ``root/objects``.
    low_watermark
        Eviction frees space down to this share of the cap, so scans stay rare.
    """

    def __init__(self, root: Path, capacity_bytes: int, low_watermark: float = 0.9) -> None:
        self.root, self.capacity_bytes, self.low_watermark = root, capacity_bytes, low_watermark
        self.objects = root / "objects"
        root.mkdir(mode=0o700, parents=True, exist_ok=True)     # owner only: KV reveals prompts
        self.objects.mkdir(mode=0o700, exist_ok=True)
        self._fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._count_fd = os.open(root / ".usage", os.O_RDWR | os.O_CREAT, 0o600)
        self._alive_fd = os.open(root / ".alive", os.O_RDWR | os.O_CREAT, 0o600)
        self._thread_lock = threading.Lock()   # flock does not exclude threads of one process
        self.alone_at_start = self._claim_alive()

    def _claim_alive(self) -> bool:
        try:
            fcntl.flock(self._alive_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            alone = False
        fcntl.flock(self._alive_fd, fcntl.LOCK_SH)
        return alone

    @contextmanager
    def locked(self) -> Iterator[None]:
        with self._thread_lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    # The count helpers below must run inside ``locked()``.
    def count(self) -> int:
        raw = os.pread(self._count_fd, 8, 0)
        return int.from_bytes(raw, "little") if len(raw) == 8 else 0

    def set_count(self, value: int) -> None:
        os.pwrite(self._count_fd, max(value, 0).to_bytes(8, "little"), 0)

    def used(self) -> int:
        with self.locked():
            return self.count()

    def recompute(self) -> int:
        """Set the count from the files (only safe when no other process writes)."""
        with self.locked():
            total = sum(f.size for f in scan_objects(self.objects))
            self.set_count(total)
            return total

    def reserve(self, nbytes: int, before_evict: Callable[[Path], None]) -> bool:
        """Count ``nbytes`` more, evicting oldest files first if needed; False if too big.

        ``before_evict(path)`` runs for each victim before it is removed (for demotion).
        """
        if nbytes > self.capacity_bytes:
            return False
        with self.locked():
            used = self.count()
            if used + nbytes > self.capacity_bytes:
                target = int(self.capacity_bytes * self.low_watermark) - nbytes
                victims = scan_objects(self.objects)
                for info in victims:
                    if used <= max(target, 0):
                        break
                    before_evict(info.path)
                    used -= self._unlink(info.path) or 0
                if used + nbytes > self.capacity_bytes:
                    # What is left is in flight in other processes, or leaked by a crashed
                    # writer (recounted when a process next opens the folder alone). Counting
                    # files here would forget live reservations and overrun the cap: refuse.
                    self.set_count(used)
                    return False
            self.set_count(used + nbytes)
            return True

    def release(self, nbytes: int) -> None:
        """Return an unused reservation."""
        with self.locked():
            self.set_count(self.count() - nbytes)

    def remove(self, path: Path, move_to: Path | None = None) -> bool:
        """Delete ``path`` (or move it out of the counted tree); False if it was gone."""
        with self.locked():
            return self._unlink(path, move_to) is not None

    def _unlink(self, path: Path, move_to: Path | None = None) -> int | None:
        """Bytes freed, or None when the file was already gone. Call inside ``locked()``."""
        try:
            size = path.lstat().st_size       # a planted symlink: its own size, not the target's
            if move_to is None:
                path.unlink()
            else:
                os.replace(path, move_to)
        except FileNotFoundError:
            return None
        self.set_count(self.count() - size)
        return size

    def close(self) -> None:
        for fd in (self._fd, self._count_fd, self._alive_fd):
            os.close(fd)
