"""The tier interface: a bounded store of KV pages addressed by 32-byte page keys.

Every tier (host memory, local disk, S3, and wrappers such as metrics) implements
:class:`Tier`. Batch calls take keys in order and return typed results; a missing, corrupt
or unreachable object is a miss, never an exception to the caller and never wrong bytes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from sgl_kvext.tiers.objects import KVPage

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, slots=True)
class TierCapabilities:
    """What a tier guarantees beyond the interface."""

    persistent: bool  # contents survive a process restart
    shared: bool      # other processes / server instances see the same contents
    #: Reads touch only this machine's memory or files (no network), so the scheduler may
    #: read a page straight into the device pool instead of waiting for a prefetch.
    local: bool = False


@dataclass(frozen=True, slots=True)
class PutResult:
    """Outcome of :meth:`Tier.put`.

    ``stored`` keys are now readable; ``rejected`` keys were not stored (too large, tier
    unreachable); ``evicted`` pages were pushed out to make room, for the caller to demote;
    ``dropped`` keys were pushed out too, their bytes not read (nothing would demote them).
    """

    stored: tuple[bytes, ...] = ()
    rejected: tuple[bytes, ...] = ()
    evicted: tuple[KVPage, ...] = field(default=())
    #: Keys evicted without their bytes (the tier's :attr:`Tier.keep_evicted` is off).
    dropped: tuple[bytes, ...] = ()

    @property
    def evictions(self) -> int:
        """Pages evicted, read or not."""
        return len(self.evicted) + len(self.dropped)


class EvictionSink(Protocol):
    """Takes the bytes of pages a tier evicts that someone still has to read (the chain's
    pages waiting to be written through): asked and given under the tier's lock, before the
    page's memory is reused."""

    def wants(self, key: bytes) -> bool: ...

    def keep(self, page: KVPage) -> None: ...


class Tier(ABC):
    """A store of KV pages.

    Invariants every implementation keeps (checked by ``tests/tiers/contract.py``):

    - ``get`` returns only keys asked for, each with exactly the bytes, dtype and shape put;
    - ``used_bytes <= capacity_bytes`` after every call;
    - putting an existing key leaves one copy; deleting a missing key is not an error;
    - no call raises for a missing, corrupt or unreachable object: it is a miss.
    """

    name: str = "tier"
    #: Whether a put reads the pages it evicts into :attr:`PutResult.evicted` (for the caller
    #: to demote) or only names them in :attr:`PutResult.dropped`. A chain turns it off where
    #: nothing would be demoted (the last tier; every tier under write-through, whose pages
    #: went down when they were stored): an eviction then copies nothing.
    keep_evicted: bool = True
    #: Where an eviction puts the bytes of a page the sink wants when :attr:`keep_evicted`
    #: is off (the key is still in :attr:`PutResult.dropped`). Tiers that keep pages in
    #: their own memory honour it (the host tier); the chain sets it on its first tier.
    eviction_sink: EvictionSink | None = None

    @property
    @abstractmethod
    def capabilities(self) -> TierCapabilities: ...

    @property
    @abstractmethod
    def capacity_bytes(self) -> int:
        """Bytes this tier may hold (its cap)."""

    @property
    @abstractmethod
    def used_bytes(self) -> int:
        """Bytes held now, as counted against the cap."""

    @abstractmethod
    def get(self, keys: Sequence[bytes]) -> dict[bytes, KVPage]:
        """The pages of ``keys`` that this tier holds; absent keys are misses."""

    def peek(self, keys: Sequence[bytes]) -> dict[bytes, KVPage]:
        """:meth:`get` that does not count as a use for eviction (the chain's own copies);
        the default is :meth:`get`."""
        return self.get(keys)

    @abstractmethod
    def put(self, pages: Sequence[KVPage]) -> PutResult:
        """Store ``pages``, evicting others if the cap requires it."""

    @abstractmethod
    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key is held, in order (a hint: a later get may still miss)."""

    @abstractmethod
    def delete(self, keys: Sequence[bytes]) -> int:
        """Remove ``keys``; return how many were held."""

    def read_into(self, keys: Sequence[bytes], out: Sequence[memoryview]) -> list[bool]:
        """Copy each held page's bytes into the writable buffer at the same position.

        For callers that own the destination (a staging buffer, a KV pool): tiers may copy
        straight from their storage, once. Returns which keys were copied; a held page whose
        size is not exactly its buffer's is a miss, never a partial copy (stale bytes would
        pass for KV). The default uses :meth:`get`.
        """
        if len(keys) != len(out):
            raise ValueError(f"{len(keys)} keys but {len(out)} output buffers")
        pages = self.get(keys)
        done = []
        for key, dst in zip(keys, out, strict=True):
            page = pages.get(key)
            fits = page is not None and page.nbytes == memoryview(dst).nbytes
            if fits:
                assert page is not None
                copy_into(dst, page.data)
            done.append(fits)
        return done

    def read_to_device(self, keys: Sequence[bytes], out: torch.Tensor,
                       rows: Sequence[int]) -> list[bool] | None:
        """Copy each held page straight into ``out[rows[i]]`` (``out``: a CUDA uint8 tensor
        [n, page bytes]), complete on return; which were copied, or None when this tier
        cannot (the caller reads host bytes with :meth:`read_into`). Sizes as there."""
        return None

    def read_in_place(self, keys: Sequence[bytes], dtype: str, shape: tuple[int, ...],
                      use: Callable[[torch.Tensor, torch.Tensor], None]) -> bool:
        """Let ``use`` read every page of ``keys`` where this tier keeps it, without a copy:
        when each is held in this tier's own CPU memory as one row, with this ``dtype`` and
        ``shape``, call ``use(rows, index)`` (``rows``: a uint8 tensor [rows, row bytes]
        viewing that memory, valid during the call only; ``index``: int64 [len(keys)], the
        row of each page) and return True. Otherwise return False without calling it (the
        caller reads with :meth:`read_into`); the default."""
        return False

    def put_in_place(self, keys: Sequence[bytes], dtype: str, shape: tuple[int, ...],
                     fill: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
                     ) -> PutResult | None:
        """:meth:`put` of pages that ``fill`` writes where this tier keeps them, without a
        staging copy: ``fill(rows, index, which)`` writes page ``which[j]`` (a position in
        ``keys``) into ``rows[index[j]]`` (``rows``: a uint8 CPU tensor [rows, row bytes]
        viewing this tier's memory, valid during the call only; a row holds one page of this
        ``dtype`` and ``shape`` from its start), for the keys not held already, in one call
        or several (a tier may fill a run larger than itself in parts). None when this tier
        cannot (nothing stored; the caller passes bytes to put); the default."""
        return None

    def put_from_device(self, keys: Sequence[bytes], rows: torch.Tensor, dtype: str,
                        shape: tuple[int, ...]) -> PutResult | None:
        """:meth:`put` of pages whose bytes are the rows of a CUDA uint8 tensor [n, bytes]
        (the pages' ``dtype`` / ``shape``), copied straight from the device, complete on
        return; or None when this tier cannot (the caller passes host bytes to put)."""
        return None

    def stats(self) -> dict[str, int]:
        """Tier-specific counters (e.g. ``quarantined``); empty by default."""
        return {}

    def close(self) -> None:  # noqa: B027  (optional hook: most tiers hold nothing to release)
        """Release threads, files and connections; the tier is unusable afterwards."""


def copy_into(dst: memoryview, data: bytes | bytearray | memoryview) -> None:
    """Copy ``data`` to the start of ``dst`` (raises if it does not fit)."""
    src = memoryview(data).cast("B")
    view = memoryview(dst).cast("B")
    if len(view) < len(src):
        raise ValueError(f"output buffer holds {len(view)} bytes, page has {len(src)}")
    view[:len(src)] = src
