"""File I/O backends for the disk tier: buffered POSIX, O_DIRECT, and kvikio (CUDA only).

Each backend writes a whole new file and reads a whole file. Writes go to a temporary name,
are fsynced, and are published by the caller with a hard link (atomic, fails if the name
exists), so a reader sees a complete object or none.

The disk tier stores host bytes (pages the host tier demoted, encoded and compressed), so
none of these is GPUDirect Storage: kvikio given host memory runs in its POSIX mode with one
more copy. ``auto`` therefore picks POSIX; ``kvikio`` stays available explicitly (its mode is
logged when it starts). A GDS path would move uncompressed pages between the device pool and
files, which this tier does not do.
"""

from __future__ import annotations

import errno
import importlib
import logging
import mmap
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("sgl_kvext")
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
    """kvikio CuFile on host bytes (its POSIX mode: see the module doc). Needs a CUDA driver.

    ``CuFile.read`` / ``write`` may move fewer bytes than asked (they return the count):
    both loop until the whole object moved, so a short read is never taken for a damaged
    file (which the tier would quarantine). ``kvikio``: the module (a test passes a stand-in).
    """

    name = "kvikio"

    def __init__(self, kvikio: Any = None) -> None:
        # fails early where kvikio is missing
        self._kvikio = kvikio if kvikio is not None else importlib.import_module("kvikio")
        logger.info("sgl-kvext: disk tier through kvikio, compat mode %s (host bytes: POSIX "
                    "I/O, not GPUDirect)", _compat_mode(self._kvikio))

    def write(self, path: Path, parts: Parts) -> None:
        import numpy as np

        data = np.frombuffer(b"".join(parts), dtype=np.uint8)
        with self._kvikio.CuFile(path, "w") as f:
            done = 0
            while done < data.size:
                n = int(f.write(data[done:], data.size - done, done))
                if n <= 0:
                    raise OSError(errno.EIO, f"kvikio wrote nothing at byte {done} of "
                                  f"{data.size}", str(path))
                done += n
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
        buf = np.frombuffer(out, dtype=np.uint8)
        with self._kvikio.CuFile(path, "r") as f:
            done = 0
            while done < size:
                n = int(f.read(buf[done:], size - done, done))
                if n <= 0:          # the file ended early (truncated since): what is there
                    return out[:done]
                done += n
        return out


def _compat_mode(kvikio: Any) -> str:
    """kvikio's compat (POSIX) mode setting, across its API versions."""
    defaults: Any = getattr(kvikio, "defaults", None)
    for read in (lambda: defaults.get("compat_mode"), lambda: defaults.compat_mode()):
        try:
            return str(read())
        except Exception:   # noqa: BLE001  (an older or newer API: try the other)
            continue
    return "unknown"


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
    """``posix``, ``direct`` or ``kvikio``; ``auto`` is POSIX (the tier's bytes are host
    bytes: kvikio would add a copy, see the module doc)."""
    if name == "auto":
        name = "posix"
    backends: dict[str, type[FileIO]] = {"posix": PosixIO, "direct": DirectIO,
                                         "kvikio": KvikioIO}
    if name not in backends:
        raise ValueError(f"unknown disk I/O backend {name!r}; allowed: auto, "
                         f"{', '.join(backends)}")
    return backends[name]()

