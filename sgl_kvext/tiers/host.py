"""Host-memory tier: a preallocated byte pool (page-locked when CUDA is present), raw bytes.

The pool is cut into fixed blocks; a page occupies ``ceil(nbytes / block)`` blocks, not
necessarily adjacent, so the pool never fragments. Put copies a page into its blocks once;
get copies them out once into a fresh buffer. When the pool is full the eviction policy picks
victims, which :meth:`HostTier.put` returns (with their bytes) for demotion to the next tier.
Thread-safe: one lock guards the index; copies run under it (they are memcpy-speed).
"""

from __future__ import annotations

import mmap
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from sgl_kvext.tiers.base import PutResult, Tier, TierCapabilities
from sgl_kvext.tiers.host_pinning import pin_host_memory, unpin_host_memory
from sgl_kvext.tiers.objects import KVPage, element_size, page_nbytes
from sgl_kvext.tiers.policies import make_policy

if TYPE_CHECKING:
    import torch

DEFAULT_BLOCK = 256 << 10
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)   # Linux >= 5.14


class _Entry(NamedTuple):
    blocks: list[int]
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


class _Pool(NamedTuple):
    array: np.ndarray
    populated: threading.Event
    pinned: bool


def _allocate_pool(nbytes: int) -> _Pool:
    """A uint8 pool of exactly ``nbytes`` in an anonymous mapping, and an event set once its
    pages are in.

    With a CUDA device the mapping is page-locked in place (``cudaHostRegister``, as SGLang's
    host KV pools do): torch's pinned allocator would round the block up to a power of two
    (a 5 GiB tier pinned 8 GiB) and keep it cached. Registering faults every page in.
    Without CUDA a background thread pre-faults the pages (``MADV_POPULATE_WRITE``, which
    never changes contents): a first write into untouched memory costs a page fault per 4 KiB
    and ran at 0.46 GB/s instead of 10 GB/s.
    """
    region, done = mmap.mmap(-1, nbytes), threading.Event()
    array = np.frombuffer(region, dtype=np.uint8)
    if pin_host_memory(array):
        done.set()
        return _Pool(array, done, True)
    threading.Thread(target=_populate, args=(region, done), name="kvext-host-populate",
                     daemon=True).start()
    return _Pool(array, done, False)


def _populate(region: mmap.mmap, done: threading.Event, chunk: int = 64 << 20) -> None:
    try:
        for start in range(0, len(region), chunk):
            region.madvise(_MADV_POPULATE_WRITE, start, min(chunk, len(region) - start))
    except (OSError, ValueError):   # an older kernel: pages fault in on first write instead
        pass
    finally:
        done.set()


class HostTier(Tier):
    """Bounded host-memory tier.

    Parameters
    ----------
    capacity_bytes
        Pool size; rounded down to whole blocks.
    policy
        ``"lru"``, ``"lfu"`` or ``"s3fifo"``.
    block_bytes
        Allocation unit.
    """

    name = "host"
    #: Devices whose tensors the DMA paths serve (with a page-locked pool).
    dma_devices: tuple[str, ...] = ("cuda",)

    def __init__(self, capacity_bytes: int, policy: str = "lru",
                 block_bytes: int = DEFAULT_BLOCK) -> None:
        if block_bytes < 1 or capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0 and block_bytes >= 1")
        self._block = block_bytes
        nblocks = capacity_bytes // block_bytes
        self._populated, self.pinned = threading.Event(), False
        self._unpin: Callable[[], object] = lambda: None
        if nblocks:
            pool = _allocate_pool(nblocks * block_bytes)
            self._pool = pool.array.reshape(nblocks, block_bytes)
            self._populated, self.pinned = pool.populated, pool.pinned
            if pool.pinned:   # unlocked before its memory is unmapped, closed or not
                self._unpin = weakref.finalize(self, unpin_host_memory, pool.array)
        else:
            self._pool = np.empty((0, block_bytes), dtype=np.uint8)
            self._populated.set()
        self._free = list(range(nblocks - 1, -1, -1))
        self._index: dict[bytes, _Entry] = {}
        self._policy = make_policy(policy)
        self._used = 0
        self._lock = threading.Lock()

    @property
    def capabilities(self) -> TierCapabilities:
        return TierCapabilities(persistent=False, shared=False, local=True)

    @property
    def capacity_bytes(self) -> int:
        return int(self._pool.size)

    @property
    def used_bytes(self) -> int:
        return self._used

    def get(self, keys: Sequence[bytes]) -> dict[bytes, KVPage]:
        return self._copies(keys, touch=True)

    def peek(self, keys: Sequence[bytes]) -> dict[bytes, KVPage]:
        return self._copies(keys, touch=False)

    def _copies(self, keys: Sequence[bytes], touch: bool) -> dict[bytes, KVPage]:
        out: dict[bytes, KVPage] = {}
        with self._lock:
            for key in keys:
                entry = self._index.get(key)
                if entry is None:
                    continue
                if touch:
                    self._policy.touch(key)
                out[key] = KVPage(key, self._read(entry), entry.dtype, entry.shape)
        return out

    def read_into(self, keys: Sequence[bytes], out: Sequence[memoryview]) -> list[bool]:
        if len(keys) != len(out):
            raise ValueError(f"{len(keys)} keys but {len(out)} output buffers")
        done = []
        with self._lock:
            for key, dst in zip(keys, out, strict=True):
                entry = self._index.get(key)
                fits = entry is not None and entry.nbytes == memoryview(dst).nbytes
                if fits:      # a page of another size is a miss (see Tier.read_into)
                    assert entry is not None
                    self._policy.touch(key)
                    self._gather(entry, np.frombuffer(dst, dtype=np.uint8))
                done.append(fits)
        return done

    def read_to_device(self, keys: Sequence[bytes], out: torch.Tensor,
                       rows: Sequence[int]) -> list[bool] | None:
        """DMA from the page-locked blocks (one copy per run of adjacent blocks); under the
        lock until the copies finish, so no block is reused while one is in flight."""
        if not self.pinned or out.device.type not in self.dma_devices:
            return None
        done = []
        with self._lock:
            pool = self._pool_tensor()
            for key, row in zip(keys, rows, strict=True):
                entry = self._index.get(key)
                fits = entry is not None and entry.nbytes == out.shape[1]
                if fits:
                    assert entry is not None
                    self._policy.touch(key)
                    for at, lo, n in self._runs(entry.blocks, entry.nbytes):
                        out[row, at:at + n].copy_(pool[lo:lo + n], non_blocking=True)
                done.append(fits)
            _sync(out)
        return done

    def read_in_place(self, keys: Sequence[bytes], dtype: str, shape: tuple[int, ...],
                      use: Callable[[torch.Tensor, torch.Tensor], None]) -> bool:
        """Under the lock (no block is reused while ``use`` reads): the pool's blocks as the
        rows, when each page is one block (the server sizes blocks to its pages)."""
        import torch

        with self._lock:
            entries = [self._index.get(key) for key in keys]
            if not all(e is not None and len(e.blocks) == 1 and e.dtype == dtype
                       and e.shape == shape for e in entries):
                return False
            for key in keys:
                self._policy.touch(key)
            index = torch.tensor([e.blocks[0] for e in entries if e is not None], device="cpu",
                                 dtype=torch.int64)
            use(self._pool_tensor().view(-1, self._block), index)
        return True

    def put_from_device(self, keys: Sequence[bytes], rows: torch.Tensor, dtype: str,
                        shape: tuple[int, ...]) -> PutResult | None:
        """DMA into the page-locked blocks; an evicted page is read out after the copies in
        flight finish (its blocks may be one of them)."""
        if not self.pinned or rows.device.type not in self.dma_devices:
            return None
        nbytes = int(rows.shape[1])
        need = -(-nbytes // self._block) if nbytes else 0
        stored: list[bytes] = []
        rejected: list[bytes] = []
        evicted: list[KVPage] = []
        dropped: list[bytes] = []
        with self._lock:
            pool, pending = self._pool_tensor(), False
            for key, src in zip(keys, rows, strict=True):
                if key in self._index:
                    self._policy.touch(key)
                    stored.append(key)
                    continue
                if need * self._block > self.capacity_bytes:
                    rejected.append(key)
                    continue
                if len(self._free) < need and pending:
                    _sync(rows)
                    pending = False
                while len(self._free) < need:
                    self._evict_one(evicted, dropped)
                blocks = [self._free.pop() for _ in range(need)]
                for at, lo, n in self._runs(blocks, nbytes):
                    pool[lo:lo + n].copy_(src[at:at + n], non_blocking=True)
                    pending = True
                self._index[key] = _Entry(blocks, nbytes, dtype, shape)
                self._policy.admit(key)
                self._used += nbytes
                stored.append(key)
            _sync(rows)
        return PutResult(tuple(stored), tuple(rejected), tuple(evicted), tuple(dropped))

    def put_in_place(self, keys: Sequence[bytes], dtype: str, shape: tuple[int, ...],
                     fill: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
                     ) -> PutResult | None:
        """When each page fits one block: blocks are freed (older pages evicted), filled,
        then indexed, at most the tier's block count at a time, so a run larger than the
        tier keeps its last pages and its earlier ones are evicted in order like older ones
        (read out for the chain as any eviction is: no page is evicted unwritten)."""
        import torch

        nbytes = page_nbytes(dtype, shape)
        if not 0 < nbytes <= self._block or self._block % element_size(dtype):
            return None
        with self._lock:
            held = [key in self._index for key in keys]
            first = {k: i for i, k in reversed(list(enumerate(keys)))}   # a key written once
            new = [i for i, (k, h) in enumerate(zip(keys, held, strict=True))
                   if not h and first[k] == i]
            for key in (k for k, h in zip(keys, held, strict=True) if h):
                self._policy.touch(key)          # recent before anything is evicted
            evicted: list[KVPage] = []
            dropped: list[bytes] = []
            rows = self._pool_tensor().view(-1, self._block)
            for lo in range(0, len(new), self._pool.shape[0]):
                part = new[lo:lo + self._pool.shape[0]]
                while len(self._free) < len(part):   # a victim may free several blocks
                    self._evict_one(evicted, dropped)
                blocks = sorted(self._free.pop() for _ in part)   # adjacent ones: slice copies
                try:
                    fill(rows, torch.tensor(blocks, dtype=torch.int64, device="cpu"),
                         torch.tensor(part, dtype=torch.int64, device="cpu"))
                except BaseException:
                    self._free.extend(blocks)    # nothing half-written is indexed
                    raise
                for i, block in zip(part, blocks, strict=True):
                    self._index[keys[i]] = _Entry([block], nbytes, dtype, shape)
                    self._policy.admit(keys[i])
                    self._used += nbytes
        return PutResult(tuple(dict.fromkeys(keys)), (), tuple(evicted), tuple(dropped))

    def put(self, pages: Sequence[KVPage]) -> PutResult:
        stored: list[bytes] = []
        rejected: list[bytes] = []
        evicted: list[KVPage] = []
        dropped: list[bytes] = []
        with self._lock:
            for page in pages:
                if page.key in self._index:
                    self._policy.touch(page.key)
                    stored.append(page.key)
                    continue
                need = -(-page.nbytes // self._block) if page.nbytes else 0
                if need * self._block > self.capacity_bytes:
                    rejected.append(page.key)
                    continue
                while len(self._free) < need:
                    self._evict_one(evicted, dropped)
                blocks = [self._free.pop() for _ in range(need)]
                self._write(blocks, page.data)
                self._index[page.key] = _Entry(blocks, page.nbytes, page.dtype, page.shape)
                self._policy.admit(page.key)
                self._used += page.nbytes
                stored.append(page.key)
        return PutResult(tuple(stored), tuple(rejected), tuple(evicted), tuple(dropped))

    def wait_populated(self, timeout_s: float) -> bool:
        """Whether the pool's memory is faulted in, waiting up to ``timeout_s`` (a benchmark
        waits, so the background pre-fault is not timed with it)."""
        return self._populated.wait(timeout_s)

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [key in self._index for key in keys]

    def close(self) -> None:
        """Unlock a page-locked pool (its memory stays mapped while anything refers to it)."""
        with self._lock:
            if self.pinned:
                self._unpin()
                self.pinned = False

    def delete(self, keys: Sequence[bytes]) -> int:
        removed = 0
        with self._lock:
            for key in keys:
                if key in self._index:
                    self._policy.remove(key)
                    self._release(key)
                    removed += 1
        return removed

    # ------------------------------------------------------------- internals
    def _pool_tensor(self) -> torch.Tensor:
        """The pool as one flat uint8 CPU tensor sharing its memory (pinned: DMA-able)."""
        import torch

        return torch.from_numpy(self._pool.reshape(-1))

    def _runs(self, blocks: list[int], nbytes: int) -> list[tuple[int, int, int]]:
        """``(page offset, pool offset, bytes)`` per run of adjacent blocks of a page."""
        out: list[tuple[int, int, int]] = []
        for i, block in enumerate(blocks):
            at, n = i * self._block, min(self._block, nbytes - i * self._block)
            if out and out[-1][1] + out[-1][2] == block * self._block:
                out[-1] = (out[-1][0], out[-1][1], out[-1][2] + n)
            else:
                out.append((at, block * self._block, n))
        return out

    def _evict_one(self, evicted: list[KVPage], dropped: list[bytes]) -> None:
        """Evict the policy's victim: its page read into ``evicted`` (before its blocks are
        reused) when :attr:`keep_evicted`, else its key into ``dropped`` and its page, if
        the :attr:`eviction_sink` wants it, into the sink."""
        key = self._policy.victim()
        sink = None if self.keep_evicted else self.eviction_sink
        if self.keep_evicted or (sink is not None and sink.wants(key)):
            entry = self._index[key]
            page = KVPage(key, self._read(entry), entry.dtype, entry.shape)
            if sink is None:
                evicted.append(page)
            else:
                sink.keep(page)
        if not self.keep_evicted:
            dropped.append(key)
        self._release(key)

    def _release(self, key: bytes) -> None:
        entry = self._index.pop(key)
        self._free.extend(entry.blocks)
        self._used -= entry.nbytes

    def _write(self, blocks: list[int], data: bytes | bytearray | memoryview) -> None:
        src = np.frombuffer(data, dtype=np.uint8)
        full = src.size // self._block
        if full:   # one vectorized scatter for the whole blocks
            self._pool[blocks[:full]] = src[:full * self._block].reshape(full, self._block)
        tail = src[full * self._block:]
        if tail.size:
            self._pool[blocks[full], :tail.size] = tail

    def _read(self, entry: _Entry) -> memoryview:
        if not entry.blocks:
            return memoryview(b"")
        # One vectorized gather into fresh memory; the last block's padding is sliced off.
        return self._pool[entry.blocks].reshape(-1)[:entry.nbytes].data

    def _gather(self, entry: _Entry, dst: np.ndarray) -> None:
        if dst.size < entry.nbytes:
            raise ValueError(f"output buffer holds {dst.size} bytes, page has {entry.nbytes}")
        full = entry.nbytes // self._block
        if full:
            np.take(self._pool, entry.blocks[:full], axis=0, mode="clip",  # clip: unbuffered
                    out=dst[:full * self._block].reshape(full, self._block))
        tail = entry.nbytes - full * self._block
        if tail:
            dst[full * self._block:entry.nbytes] = self._pool[entry.blocks[full], :tail]


def _sync(t: torch.Tensor) -> None:
    """Wait for the copies queued on ``t``'s device's current stream."""
    import torch

    if t.device.type == "cuda":
        torch.cuda.current_stream(t.device).synchronize()
