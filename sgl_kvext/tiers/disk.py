"""Disk tier: one self-describing file per page in a folder shared by processes.

Layout under ``root``: ``objects/<namespace>/<k0k1>/<key>.kvx`` (the counted tree),
``tmp/`` (writes in flight, named by process id), ``quarantine/`` (corrupt files kept for
inspection, at most ``QUARANTINE_KEEP``). Writes are atomic: encode, write a temp file,
fsync, then hard-link it to its final name (which fails if another process got there first)
and unlink the temp. The byte cap holds across processes (:class:`DiskLedger`).

On start the tier checks every header in its namespace, quarantines bad files, removes temp
files of dead processes and, when it is the folder's only user, recomputes the byte count.
A file that fails its checksum on read is quarantined and is a miss.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sgl_kvext.scheduler_turn import pause
from sgl_kvext.tiers.base import PutResult, Tier, TierCapabilities
from sgl_kvext.tiers.disk_io import FileIO, UnsafeFile, make_io, open_object
from sgl_kvext.tiers.disk_ledger import SUFFIX, DiskLedger, scan_objects
from sgl_kvext.tiers.objects import (
    MAX_META_BYTES,
    PLAIN,
    PREFIX_BYTES,
    CorruptObject,
    KVPage,
    Protection,
    decode_object,
    encode_object,
    read_header,
)

QUARANTINE_KEEP = 64
_HEAD_BYTES = 4096


class DiskTier(Tier):
    """Local-disk tier.

    Parameters
    ----------
    root
        Cache folder; may be shared with other processes and namespaces.
    capacity_bytes
        Cap on all object files in ``root``, whichever process wrote them.
    namespace
        Model-identity digest; this tier reads and writes only its own namespace.
    codec, level
        Stored-object codec (``zstd`` or ``none``) and zstd level.
    io
        ``auto`` (POSIX), ``posix``, ``direct`` (O_DIRECT) or ``kvikio`` (see ``disk_io``), or a
        backend instance.
    threads
        Thread pool of batch calls, which encode (zstd releases the GIL) and write pages in
        parallel; default one per core, 4 to 16: one thread encodes ~0.45 GB/s of bf16 KV,
        a busy GPU server spills GB/s (docs/benchmarks.md, GPU).
    """

    name = "disk"

    def __init__(self, root: Path, capacity_bytes: int, namespace: bytes, codec: str = "zstd",
                 level: int = 1, io: str | FileIO = "auto", threads: int | None = None,
                 protection: Protection = PLAIN) -> None:
        self.root, self.namespace, self.codec, self.level = Path(root), namespace, codec, level
        self.protection = protection
        self._io = io if isinstance(io, FileIO) else make_io(io)
        self._ledger = DiskLedger(self.root, capacity_bytes)
        self._dir = self._ledger.objects / namespace.hex()[:32]
        self._tmp = self.root / "tmp"
        self._quarantine = self.root / "quarantine"
        for folder in (self._dir, self._tmp, self._quarantine):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        threads = max(4, min(16, os.cpu_count() or 4)) if threads is None else threads
        self._pool = ThreadPoolExecutor(max(threads, 1), thread_name_prefix="kvext-disk")
        self._counters = {"quarantined": 0, "temp_removed": 0, "evicted": 0}
        self._counter_lock = threading.Lock()
        self._start_scan()

    # ------------------------------------------------------------- interface
    @property
    def capabilities(self) -> TierCapabilities:
        return TierCapabilities(persistent=True, shared=True, local=True)

    @property
    def capacity_bytes(self) -> int:
        return self._ledger.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self._ledger.used()

    def get(self, keys: Sequence[bytes]) -> dict[bytes, KVPage]:
        pause()       # a background caller yields the scheduler its turn (scheduler_turn)
        pages = self._pool.map(self._read, keys)
        return {key: page for key, page in zip(keys, pages, strict=True) if page is not None}

    def put(self, pages: Sequence[KVPage]) -> PutResult:
        pause()
        results = list(self._pool.map(self._write, pages))
        stored = tuple(p.key for p, (ok, _) in zip(pages, results, strict=True) if ok)
        rejected = tuple(p.key for p, (ok, _) in zip(pages, results, strict=True) if not ok)
        evicted = tuple(p for _, out in results for p in out if isinstance(p, KVPage))
        dropped = tuple(p for _, out in results for p in out if isinstance(p, bytes))
        return PutResult(stored, rejected, evicted, dropped)

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        return [self._path(key).is_file() for key in keys]

    def delete(self, keys: Sequence[bytes]) -> int:
        return sum(1 for key in keys if self._ledger.remove(self._path(key)))

    def stats(self) -> dict[str, int]:
        return dict(self._counters)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._ledger.close()

    # ------------------------------------------------------------- internals
    def _path(self, key: bytes) -> Path:
        name = key.hex()
        return self._dir / name[:2] / (name + SUFFIX)

    def _read(self, key: bytes) -> KVPage | None:
        path = self._path(key)
        try:
            blob = self._io.read(path)
        except FileNotFoundError:
            return None
        except UnsafeFile:
            self._quarantine_file(path)
            return None
        try:
            page = decode_object(blob, self.namespace, key, self.protection)
        except CorruptObject:
            self._quarantine_file(path)
            return None
        try:
            os.utime(path)   # mtime orders eviction: reads keep a file young
        except FileNotFoundError:
            pass
        return page

    def _write(self, page: KVPage) -> tuple[bool, list[KVPage | bytes]]:
        final = self._path(page.key)
        if final.is_file():
            return True, []
        encoded = encode_object(page, self.namespace, self.codec, self.level, self.protection)
        size = encoded.nbytes
        demoted: list[KVPage | bytes] = []      # pages, or keys when not keep_evicted
        if not self._ledger.reserve(size, lambda victim: self._collect(victim, demoted)):
            return False, demoted
        tmp = self._tmp / f"{os.getpid()}-{uuid.uuid4().hex}.part"
        try:
            self._io.write(tmp, encoded.parts)
            final.parent.mkdir(mode=0o700, exist_ok=True)
            os.link(tmp, final)
        except FileExistsError:       # another process stored the same key first
            self._ledger.release(size)
        except OSError:
            self._ledger.release(size)
            return False, demoted
        finally:
            tmp.unlink(missing_ok=True)
        return True, demoted

    def _collect(self, victim: Path, demoted: list[KVPage | bytes]) -> None:
        """Before a victim is removed: keep its page (if ours and intact) for demotion, or
        only its key when :attr:`keep_evicted` is off."""
        with self._counter_lock:
            self._counters["evicted"] += 1
        if victim.parent.parent != self._dir:
            return
        key = bytes.fromhex(victim.name.removesuffix(SUFFIX))
        if not self.keep_evicted:
            demoted.append(key)
            return
        try:
            demoted.append(decode_object(self._io.read(victim), self.namespace, key,
                                         self.protection))
        except (FileNotFoundError, CorruptObject, ValueError):
            pass

    def _quarantine_file(self, path: Path) -> None:
        target = self._quarantine / f"{path.name}.{uuid.uuid4().hex[:8]}"
        if self._ledger.remove(path, move_to=target):
            with self._counter_lock:
                self._counters["quarantined"] += 1
        with self._counter_lock:     # one clean-up at a time (others may list a removed file)
            kept = sorted(self._quarantine.iterdir(), key=_mtime_or_gone)
            for old in kept[:-QUARANTINE_KEEP]:
                old.unlink(missing_ok=True)

    def _start_scan(self) -> None:
        for tmp in self._tmp.glob("*.part"):
            pid = tmp.name.split("-", 1)[0]
            if self._ledger.alone_at_start or not (pid.isdigit() and _alive(int(pid))):
                tmp.unlink(missing_ok=True)
                self._counters["temp_removed"] += 1
        for info in scan_objects(self._dir):
            if not self._header_ok(info.path, info.size):
                self._quarantine_file(info.path)
        if self._ledger.alone_at_start:
            self._ledger.recompute()

    def _header_ok(self, path: Path, size: int) -> bool:
        try:
            fd, _ = open_object(path)              # never a symlink's target or a FIFO
            with open(fd, "rb") as f:
                head = f.read(_HEAD_BYTES)
                try:
                    header = read_header(head)
                except CorruptObject:
                    if size <= len(head):
                        return False
                    f.seek(0)   # a meta longer than the first read
                    header = read_header(f.read(PREFIX_BYTES + MAX_META_BYTES))
        except (OSError, CorruptObject, UnsafeFile):
            return False
        return (header.total_size == size
                and header.namespace == self.namespace.hex()
                and path.name == header.key + SUFFIX)


def _mtime_or_gone(path: Path) -> int:
    """A file's mtime; -1 when another process removed it since it was listed."""
    try:
        return path.lstat().st_mtime_ns
    except FileNotFoundError:
        return -1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
