"""File I/O backends for the disk tier: buffered POSIX, O_DIRECT, and kvikio (CUDA only).

Each backend writes a whole new file and reads a whole file. Writes go to a temporary name,
are fsynced, and are published by the caller with a hard link (atomic, fails if the name
exists), so a reader sees a complete object or none.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

ALIGN = 4096
Parts = Sequence[bytes | bytearray | memoryview]
#: Largest object file read (the largest decoded payload plus zstd's worst-case growth,
#: the meta and the prefix): a bigger file is not read at all.
MAX_FILE_BYTES = (1 << 30) + (1 << 23) + (1 << 17)


class UnsafeFile(ValueError):
    """A symlink, FIFO, device or oversized file where an object file should be."""


def open_object(path: Path, flags: int = 0, limit: int = MAX_FILE_BYTES) -> tuple[int, int]:
    """``(fd, size)`` of the regular file ``path``, opened read-only without following a
    symlink or blocking on a FIFO; :class:`UnsafeFile` for anything else or a file over
    ``limit`` bytes, FileNotFoundError if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(f"{path.name}: a symlink") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
        os.close(fd)
        raise UnsafeFile(f"{path.name}: not a regular file of at most {limit} bytes")
    return fd, st.st_size


class FileIO(ABC):
    name: str

    @abstractmethod
    def write(self, path: Path, parts: Parts) -> None:
        """Create ``path`` (must not exist) holding ``parts`` in order, durable on return."""

    @abstractmethod
    def read(self, path: Path) -> bytes | bytearray:
        """Whole contents of the regular file ``path`` (:func:`open_object`: UnsafeFile for
        anything else); FileNotFoundError if it is gone."""


class PosixIO(FileIO):
    """pwritev / preadv through the page cache."""

    name = "posix"

    def write(self, path: Path, parts: Parts) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            views = [memoryview(p).cast("B") for p in parts if len(p)]
            total, done = sum(len(v) for v in views), 0
            while done < total:
                done += os.pwritev(fd, _remaining(views, done), done)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, path: Path) -> bytearray:
        fd, size = open_object(path)
        try:
            out = bytearray(size)
            view, done = memoryview(out), 0
            while done < size:
                n = os.preadv(fd, [view[done:]], done)
                if n == 0:
                    break
                done += n
            return out if done == size else out[:done]
        finally:
            os.close(fd)


class DirectIO(FileIO):
    """O_DIRECT with page-aligned bounce buffers; falls back to PosixIO where unsupported."""

    name = "direct"

    def __init__(self) -> None:
        self._fallback = PosixIO()

    def write(self, path: Path, parts: Parts) -> None:
        size = sum(len(p) for p in parts)
        padded = -(-max(size, 1) // ALIGN) * ALIGN
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
        except OSError:  # e.g. tmpfs: EINVAL
            return self._fallback.write(path, parts)
        try:
            with mmap.mmap(-1, padded) as buf:
                pos = 0
                for part in parts:
                    buf[pos:pos + len(part)] = part
                    pos += len(part)
                done = 0
                while done < padded:
                    done += os.pwritev(fd, [memoryview(buf)[done:]], done)
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, path: Path) -> bytes | bytearray:
        try:
            fd, size = open_object(path, os.O_DIRECT)
        except (FileNotFoundError, UnsafeFile):
            raise
        except OSError:
            return self._fallback.read(path)
        try:
            padded = -(-max(size, 1) // ALIGN) * ALIGN
            with mmap.mmap(-1, padded) as buf:
                done = 0
                while done < size:
                    n = os.preadv(fd, [memoryview(buf)[done:]], done)
                    if n == 0:
                        break
                    done += n
                return bytes(buf[:min(done, size)])
        finally:
            os.close(fd)


class KvikioIO(FileIO):
    """kvikio CuFile (GPUDirect Storage when available). Needs a CUDA driver."""

    name = "kvikio"

    def __init__(self) -> None:
        import kvikio  # noqa: F401  (fails early where kvikio is missing)

        self._kvikio = kvikio

    def write(self, path: Path, parts: Parts) -> None:
        import numpy as np

        with self._kvikio.CuFile(path, "w") as f:
            f.write(np.frombuffer(b"".join(parts), dtype=np.uint8))
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, path: Path) -> bytearray:
        import numpy as np

        fd, size = open_object(path)          # checked first: kvikio follows links
        os.close(fd)
        out = bytearray(size)
        with self._kvikio.CuFile(path, "r") as f:
            f.read(np.frombuffer(out, dtype=np.uint8))
        return out


def _remaining(views: list[memoryview], offset: int) -> list[memoryview]:
    """The buffers still to write after ``offset`` bytes (pwritev may write partially)."""
    out = []
    for v in views:
        if offset >= len(v):
            offset -= len(v)
            continue
        out.append(v[offset:])
        offset = 0
    return out


def make_io(name: str) -> FileIO:
    """``posix``, ``direct`` or ``kvikio``; ``auto`` picks kvikio when CUDA is usable."""
    if name == "auto":
        name = "kvikio" if _cuda_and_kvikio() else "posix"
    backends: dict[str, type[FileIO]] = {"posix": PosixIO, "direct": DirectIO,
                                         "kvikio": KvikioIO}
    if name not in backends:
        raise ValueError(f"unknown disk I/O backend {name!r}; allowed: auto, "
                         f"{', '.join(backends)}")
    return backends[name]()


def _cuda_and_kvikio() -> bool:
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import kvikio  # noqa: F401
    except ImportError:
        return False
    return True
