"""Bounded, thread-safe memories of recently seen keys (least recently used forgotten first)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable


class RecentKeys:
    """At most ``capacity`` keys; a lookup or an add makes a key the most recent.

    Used where remembering a key is only an optimisation (skip a store already done, try a
    fragment known to be stored): forgetting one costs a redundant store or a lookup, never
    a wrong answer.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity {capacity}: must be >= 1")
        self.capacity = capacity
        self._keys: OrderedDict[bytes, None] = OrderedDict()   # oldest first
        self._lock = threading.Lock()

    def seen(self, key: bytes) -> bool:
        """Whether ``key`` is remembered (refreshing it if so)."""
        with self._lock:
            if key in self._keys:
                self._keys.move_to_end(key)
                return True
            return False

    def add(self, keys: Iterable[bytes]) -> None:
        """Remember ``keys`` as the most recent, forgetting the oldest beyond ``capacity``."""
        with self._lock:
            for key in keys:
                self._keys[key] = None
                self._keys.move_to_end(key)
            while len(self._keys) > self.capacity:
                self._keys.popitem(last=False)

    def discard(self, keys: Iterable[bytes]) -> None:
        """Forget ``keys`` (those not remembered are ignored)."""
        with self._lock:
            for key in keys:
                self._keys.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)

