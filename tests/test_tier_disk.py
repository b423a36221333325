"""Disk tier: the contract, corruption, restart, torn writes and the shared byte cap."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import disk_bytes_now
from tier_contract import PAGE, BoundedTierContract, assert_same, key_of, page_of

from sgl_kvext.tiers.disk import DiskTier
from sgl_kvext.tiers.disk_ledger import scan_objects

NS = bytes(range(32))


@pytest.mark.parametrize("io", ["posix", "direct"])
@pytest.mark.parametrize("codec", ["zstd", "none"])
class TestDiskTierContract(BoundedTierContract):
    @pytest.fixture(autouse=True)
    def _setup(self, tmp_path: Path, io: str, codec: str) -> None:
        self.root, self.io, self.codec = tmp_path, io, codec
        self.count = 0

    def make_tier(self, capacity: int) -> DiskTier:
        self.count += 1   # a fresh folder per tier
        return DiskTier(self.root / f"d{self.count}", capacity, NS, codec=self.codec, io=self.io)


def _files(tier: DiskTier) -> list[Path]:
    return [f.path for f in scan_objects(tier.root / "objects")]


@pytest.mark.parametrize("damage", ["flip_payload", "flip_header", "truncate", "empty"])
def test_corrupt_file_is_a_miss_and_quarantined(tmp_path: Path, damage: str) -> None:
    tier = DiskTier(tmp_path, 50 * PAGE, NS)
    tier.put([page_of(1), page_of(2)])
    path = next(p for p in _files(tier) if p.name.startswith(key_of(1).hex()))
    blob = bytearray(path.read_bytes())
    if damage == "flip_payload":
        blob[-10] ^= 0x40
    elif damage == "flip_header":
        blob[60] ^= 0x01
    elif damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob = bytearray()
    path.write_bytes(bytes(blob))
    assert tier.get([key_of(1), key_of(2)]).keys() == {key_of(2)}
    assert tier.stats()["quarantined"] == 1
    assert not path.exists() and len(list((tmp_path / "quarantine").iterdir())) == 1
    tier.close()


def test_object_renamed_to_another_key_is_not_served(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 50 * PAGE, NS)
    tier.put([page_of(1)])
    src = next(iter(_files(tier)))
    dst = src.parent.parent / key_of(5).hex()[:2] / (key_of(5).hex() + ".kvx")
    dst.parent.mkdir(exist_ok=True)
    os.link(src, dst)
    assert tier.get([key_of(5)]) == {}
    assert tier.stats()["quarantined"] == 1
    tier.close()


def test_restart_serves_old_pages_and_quarantines_bad_headers(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 50 * PAGE, NS)
    tier.put([page_of(i) for i in range(4)])
    tier.close()
    bad = next(p for p in _files(tier) if p.name.startswith(key_of(3).hex()))
    bad.write_bytes(b"NOPE" + bad.read_bytes()[4:])
    stale = tmp_path / "tmp" / "999999999-deadbeef.part"
    stale.write_bytes(b"half a write")
    again = DiskTier(tmp_path, 50 * PAGE, NS)
    assert again.stats()["quarantined"] == 1 and again.stats()["temp_removed"] == 1
    assert not stale.exists()
    got = again.get([key_of(i) for i in range(4)])
    assert got.keys() == {key_of(0), key_of(1), key_of(2)}
    for i in range(3):
        assert_same(got[key_of(i)], page_of(i))
    assert again.used_bytes == sum(f.stat().st_size for f in _files(again))
    again.close()


def test_evictions_are_read_for_demotion_only_when_kept(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 3 * PAGE + 3 * 4096, NS, codec="none")
    tier.put([page_of(i) for i in range(3)])
    kept = tier.put([page_of(3)])
    assert [p.key for p in kept.evicted] and not kept.dropped
    index = {key_of(i): i for i in range(3)}
    assert_same(kept.evicted[0], page_of(index[kept.evicted[0].key]))
    tier.keep_evicted = False                      # a chain with nothing to demote them to
    results = [tier.put([page_of(i)]) for i in range(4, 8)]
    dropped = [key for r in results for key in r.dropped]
    assert dropped and not any(r.evicted for r in results)
    assert not any(tier.exists(dropped)) and tier.exists([key_of(7)]) == [True]
    tier.close()


def test_namespaces_are_isolated(tmp_path: Path) -> None:
    a = DiskTier(tmp_path, 50 * PAGE, NS)
    b = DiskTier(tmp_path, 50 * PAGE, bytes(32))
    a.put([page_of(1)])
    assert b.get([key_of(1)]) == {} and b.exists([key_of(1)]) == [False]
    assert a.get([key_of(1)]).keys() == {key_of(1)}
    a.close()
    b.close()


WRITER = """
import sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from sgl_kvext.tiers.disk import DiskTier
from tier_contract import page_of
tier = DiskTier(Path({root!r}), {cap}, bytes(range(32)), codec="none")
print("ready", flush=True)
for i in range({n}):
    tier.put([page_of(i, 30000, salt={salt!r})])
    {extra}
tier.close()
"""


def _spawn(root: Path, cap: int, n: int, salt: str, extra: str = "") -> subprocess.Popen[str]:
    code = WRITER.format(tests=str(Path(__file__).parent), root=str(root), cap=cap, n=n,
                         salt=salt, extra=extra or "pass")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_cap_holds_under_a_two_process_write_storm(tmp_path: Path) -> None:
    cap = 3_000_000
    procs = [_spawn(tmp_path, cap, 400, salt) for salt in ("a", "b")]
    peak = 0
    while any(p.poll() is None for p in procs):
        peak = max(peak, disk_bytes_now(tmp_path))
        time.sleep(0.01)
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    final = sum(f.size for f in scan_objects(tmp_path / "objects"))
    assert peak <= cap * 1.01 and final <= cap * 1.01
    assert final >= cap * 0.5                      # it kept filling, it did not just give up
    tier = DiskTier(tmp_path, cap, NS, codec="none")   # alone: recount from the files
    assert tier.used_bytes == final
    tier.close()


def test_killed_writer_leaves_no_torn_object(tmp_path: Path) -> None:
    proc = _spawn(tmp_path, 10**9, 100_000, "k", extra="")
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    tier = DiskTier(tmp_path, 10**9, NS, codec="none")
    files = _files(tier)
    assert files, "the writer stored something before it was killed"
    keys = [bytes.fromhex(p.name.removesuffix(".kvx")) for p in files]
    got = tier.get(keys)
    assert len(got) == len(keys) and tier.stats()["quarantined"] == 0
    assert not list((tmp_path / "tmp").iterdir())
    tier.close()


def _forged(key: bytes, dtype: str, shape: tuple[int, ...], raw_size: int,
            payload: bytes) -> bytes:
    """An object a writer of the folder could plant: any header, a valid checksum."""
    import json

    import xxhash

    from sgl_kvext.tiers import objects

    meta = json.dumps({"namespace": NS.hex(), "key": key.hex(), "dtype": dtype,
                       "shape": list(shape), "codec": "zstd", "width": 2,
                       "raw_size": raw_size}, sort_keys=True).encode()
    digest = xxhash.xxh3_128(meta)
    digest.update(payload)
    return objects._PREFIX.pack(objects.MAGIC, objects.VERSION, 0, len(meta), len(payload),
                                digest.digest()) + meta + payload


@pytest.mark.parametrize("forgery", ["zstd_bomb", "huge_declared_size", "shape_mismatch"])
def test_forged_sizes_are_a_miss_before_any_big_allocation(tmp_path: Path, forgery: str) -> None:
    import tracemalloc

    import zstandard

    tier = DiskTier(tmp_path, 50 * PAGE, NS)
    tier.put([page_of(1), page_of(2)])
    path = next(p for p in _files(tier) if p.name.startswith(key_of(1).hex()))
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(256 << 20))  # 256 MiB of zeros
    shape, raw = {"zstd_bomb": ((PAGE // 2,), PAGE),
                  "huge_declared_size": ((1 << 39,), 1 << 40),
                  "shape_mismatch": ((10,), PAGE)}[forgery]
    path.write_bytes(_forged(key_of(1), "bfloat16", shape, raw, bomb))
    tracemalloc.start()
    try:
        got = tier.get([key_of(1), key_of(2)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.keys() == {key_of(2)}
    assert tier.stats()["quarantined"] == 1
    assert peak < 16 << 20, f"{peak} bytes allocated reading a {len(bomb)}-byte forgery"
    tier.close()


def test_planted_symlinks_and_fifos_are_quarantined_without_hanging(tmp_path: Path) -> None:
    import threading

    tier = DiskTier(tmp_path, 50 * PAGE, NS)
    tier.put([page_of(1), page_of(2), page_of(3)])
    files = {p.name[:64]: p for p in _files(tier)}
    tier.close()
    secret = tmp_path / "secret"
    secret.write_bytes(files[key_of(3).hex()].read_bytes())   # a valid object, elsewhere
    link, fifo = files[key_of(1).hex()], files[key_of(2).hex()]
    link.unlink()
    link.symlink_to(secret)
    fifo.unlink()
    os.mkfifo(fifo)
    started: list[DiskTier] = []
    scan = threading.Thread(target=lambda: started.append(DiskTier(tmp_path, 50 * PAGE, NS)),
                            daemon=True)
    scan.start()
    scan.join(20)
    assert started, "the start-up scan hung on a FIFO"
    again = started[0]
    assert again.get([key_of(1), key_of(2), key_of(3)]).keys() == {key_of(3)}
    assert again.stats()["quarantined"] == 2 and secret.exists()
    again.close()


@pytest.mark.parametrize("io", ["posix", "direct"])
def test_reading_a_symlink_planted_after_start_is_a_miss(tmp_path: Path, io: str) -> None:
    tier = DiskTier(tmp_path, 50 * PAGE, NS, io=io)
    tier.put([page_of(1), page_of(2)])
    files = {p.name[:64]: p for p in _files(tier)}
    target = tmp_path / "elsewhere"
    os.replace(files[key_of(2).hex()], target)
    files[key_of(2).hex()].symlink_to(target)
    assert tier.get([key_of(1), key_of(2)]).keys() == {key_of(1)}
    assert tier.stats()["quarantined"] == 1 and target.exists()
    tier.close()


def test_concurrent_quarantines_never_fail_a_read(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from sgl_kvext.tiers import disk

    monkeypatch.setattr(disk, "QUARANTINE_KEEP", 2)   # clean-up on every quarantine
    tier = DiskTier(tmp_path, 10**9, NS, codec="none", threads=8)
    pages = [page_of(i, 4096) for i in range(1000)]
    tier.put(pages)
    for path in _files(tier):
        path.write_bytes(b"damaged")
    for _ in range(3):                              # 8 reader threads quarantine at once
        assert tier.get([p.key for p in pages]) == {}
    assert tier.stats()["quarantined"] == 1000
    assert len(list((tmp_path / "quarantine").iterdir())) <= 2 + 8
    tier.close()


class ShortTransferKvikioFake:
    """kvikio's module as far as KvikioIO uses it, over POSIX files, moving at most
    ``chunk`` bytes per call (kvikio's CuFile may; a local test disk never returns short)."""

    chunk = 1000

    class defaults:   # noqa: N801  (kvikio's name)
        @staticmethod
        def get(name: str) -> str:
            return "ON (fake)"

    class CuFile:
        def __init__(self, path: Path, mode: str) -> None:
            self.f = open(path, mode + "b")   # noqa: SIM115  (closed by __exit__)

        def __enter__(self) -> ShortTransferKvikioFake.CuFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def write(self, buf, size: int, file_offset: int) -> int:  # type: ignore[no-untyped-def]
            n = min(size, ShortTransferKvikioFake.chunk)
            return os.pwrite(self.f.fileno(), bytes(buf[:n]), file_offset)

        def read(self, buf, size: int, file_offset: int) -> int:  # type: ignore[no-untyped-def]
            data = os.pread(self.f.fileno(), min(size, ShortTransferKvikioFake.chunk),
                            file_offset)
            buf[:len(data)] = memoryview(data)
            return len(data)


def test_kvikio_short_transfers_move_the_whole_object(tmp_path: Path) -> None:
    """A read or write that moves part of an object is continued, never taken for damage:
    pages of 40 transfers each come back intact and nothing is quarantined."""
    from sgl_kvext.tiers.disk_io import KvikioIO

    tier = DiskTier(tmp_path, 50 * PAGE, NS, codec="none", io=KvikioIO(ShortTransferKvikioFake))
    pages = [page_of(i) for i in range(4)]
    tier.put(pages)
    got = tier.get([p.key for p in pages])
    assert len(got) == 4
    for page in pages:
        assert_same(got[page.key], page)
    assert not any((tmp_path / "quarantine").iterdir())
    tier.close()
