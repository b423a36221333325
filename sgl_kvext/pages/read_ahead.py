"""Pages read ahead for a waiting request, kept for its load.

A load reads lower local tiers (disk) on the scheduler thread only for a short, bounded
time (:data:`~sgl_kvext.pages.tiering.DIRECT_READ_S`); the prefetcher reads the rest of the
request's run on its own thread while admission holds the request. Those pages are promoted
to the host tier, but a host tier smaller than the run evicts them again before the load;
kept here as well, the load copies them from memory (no disk read on the scheduler thread).

Bounded: at most ``max_bytes`` in all; a request whose pages would pass the bound keeps none
(its load reads them as before). Pages leave when the load takes them or the request leaves.
Each page's origin (the chain index of the tier it was read from) is kept beside it: the
request's response says which tier its cached tokens came from.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Mapping, Sequence
from types import MappingProxyType

from sgl_kvext.tiers.objects import KVPage

#: Default bound on the bytes read ahead for all waiting requests together.
READ_AHEAD_BYTES = 256 << 20
NOTHING: Mapping[bytes, KVPage] = MappingProxyType({})
_NO_ORIGINS: Mapping[bytes, int] = MappingProxyType({})


class ReadAhead:
    """Pages read ahead, by request id (thread-safe; a request's set is never changed in place,
    so a mapping handed out stays valid after the request's pages are dropped)."""

    def __init__(self, max_bytes: int = READ_AHEAD_BYTES) -> None:
        self.max_bytes = max_bytes
        self._pages: dict[Hashable, Mapping[bytes, KVPage]] = {}
        self._origins: dict[Hashable, Mapping[bytes, int]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.counters = {"kept_pages": 0, "refused_pages": 0}

    def keep(self, request_id: Hashable, pages: Sequence[KVPage], tiers: Sequence[int]) -> bool:
        """Keep ``pages`` for ``request_id`` (replacing what it had), all or none;
        ``tiers[i]``: the chain index ``pages[i]`` was read from."""
        if len(tiers) != len(pages):
            raise ValueError(f"{len(tiers)} tiers for {len(pages)} pages")
        size = sum(p.nbytes for p in pages)
        with self._lock:
            self._bytes -= _size(self._pages.pop(request_id, NOTHING))
            self._origins.pop(request_id, None)
            if self._bytes + size > self.max_bytes:
                self.counters["refused_pages"] += len(pages)
                return False
            self._pages[request_id] = MappingProxyType({p.key: p for p in pages})
            self._origins[request_id] = MappingProxyType(
                {p.key: t for p, t in zip(pages, tiers, strict=True)})
            self._bytes += size
            self.counters["kept_pages"] += len(pages)
            return True

    def peek(self, request_id: Hashable) -> Mapping[bytes, KVPage]:
        """The request's pages (empty if none), left in place."""
        with self._lock:
            return self._pages.get(request_id, NOTHING)

    def origins(self, request_id: Hashable) -> Mapping[bytes, int]:
        """The chain index each of the request's pages was read from (empty if none)."""
        with self._lock:
            return self._origins.get(request_id, _NO_ORIGINS)

    def drop(self, request_id: Hashable) -> None:
        """Release the request's pages (its load took them, or it left)."""
        with self._lock:
            self._bytes -= _size(self._pages.pop(request_id, NOTHING))
            self._origins.pop(request_id, None)

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes


def _size(pages: Mapping[bytes, KVPage]) -> int:
    return sum(p.nbytes for p in pages.values())
