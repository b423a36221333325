"""Eviction policies for bounded tiers: LRU, LFU and S3-FIFO, chosen by name.

A policy tracks keys only (sizes and bytes stay with the tier). The tier calls ``admit`` when
it stores a key, ``touch`` on a hit, ``remove`` when a key leaves for another reason, and
``victim`` to choose (and stop tracking) the next key to evict.
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections import OrderedDict


class EvictionPolicy(ABC):
    @abstractmethod
    def admit(self, key: bytes) -> None:
        """Start tracking ``key`` (it must not be tracked already)."""

    @abstractmethod
    def touch(self, key: bytes) -> None:
        """Record a hit on a tracked key (untracked keys are ignored)."""

    @abstractmethod
    def remove(self, key: bytes) -> None:
        """Stop tracking ``key`` (untracked keys are ignored)."""

    @abstractmethod
    def victim(self) -> bytes:
        """Choose the next key to evict and stop tracking it; LookupError when empty."""

    @abstractmethod
    def __len__(self) -> int: ...


class LRUPolicy(EvictionPolicy):
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def admit(self, key: bytes) -> None:
        self._order[key] = None

    def touch(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def victim(self) -> bytes:
        if not self._order:
            raise LookupError("no key to evict")
        return self._order.popitem(last=False)[0]

    def __len__(self) -> int:
        return len(self._order)


class LFUPolicy(EvictionPolicy):
    """Fewest hits first; ties go to the least recently used (heap with lazy deletion)."""

    def __init__(self) -> None:
        self._state: dict[bytes, tuple[int, int]] = {}   # key -> (hits, last sequence)
        self._heap: list[tuple[int, int, bytes]] = []
        self._seq = itertools.count()

    def _push(self, key: bytes, hits: int) -> None:
        seq = next(self._seq)
        self._state[key] = (hits, seq)
        heapq.heappush(self._heap, (hits, seq, key))
        if len(self._heap) > 4 * len(self._state) + 64:   # drop stale entries
            self._heap = [(h, s, k) for k, (h, s) in self._state.items()]
            heapq.heapify(self._heap)

    def admit(self, key: bytes) -> None:
        self._push(key, 0)

    def touch(self, key: bytes) -> None:
        if key in self._state:
            self._push(key, self._state[key][0] + 1)

    def remove(self, key: bytes) -> None:
        self._state.pop(key, None)

    def victim(self) -> bytes:
        while self._heap:
            hits, seq, key = heapq.heappop(self._heap)
            if self._state.get(key) == (hits, seq):
                del self._state[key]
                return key
        raise LookupError("no key to evict")

    def __len__(self) -> int:
        return len(self._state)


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP 2023): a small probationary FIFO, a main FIFO, a ghost list.

    New keys enter the small queue (10% of tracked keys); a key evicted from it without a hit
    is remembered in the ghost list, and a ghost key re-admitted goes straight to main.
    Main re-queues keys with hits (frequency capped at 3) and evicts those without.
    """

    def __init__(self, small_ratio: float = 0.1) -> None:
        self.small_ratio = small_ratio
        self._small: OrderedDict[bytes, None] = OrderedDict()
        self._main: OrderedDict[bytes, None] = OrderedDict()
        self._ghost: OrderedDict[bytes, None] = OrderedDict()
        self._freq: dict[bytes, int] = {}

    def admit(self, key: bytes) -> None:
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None

    def touch(self, key: bytes) -> None:
        if key in self._freq:
            self._freq[key] = min(self._freq[key] + 1, 3)

    def remove(self, key: bytes) -> None:
        if self._freq.pop(key, None) is not None:
            self._small.pop(key, None)
            self._main.pop(key, None)

    def victim(self) -> bytes:
        while self._small or self._main:
            if self._small and (len(self._small) >= self.small_ratio * len(self) or not self._main):
                key, _ = self._small.popitem(last=False)
                if self._freq[key] > 0:
                    self._freq[key] = 0
                    self._main[key] = None
                    continue
                self._remember(key)
            else:
                key, _ = self._main.popitem(last=False)
                if self._freq[key] > 0:
                    self._freq[key] -= 1
                    self._main[key] = None
                    continue
            del self._freq[key]
            return key
        raise LookupError("no key to evict")

    def _remember(self, key: bytes) -> None:
        self._ghost[key] = None
        while len(self._ghost) > max(len(self._freq), 16):
            self._ghost.popitem(last=False)

    def __len__(self) -> int:
        return len(self._freq)


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy, "s3fifo": S3FIFOPolicy}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; allowed: "
                         f"{', '.join(POLICIES)}") from None
