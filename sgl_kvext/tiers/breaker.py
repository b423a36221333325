"""A circuit breaker: after repeated failures, calls are refused at once for a cool-down.

Closed: calls pass; ``failure_threshold`` consecutive failures open it. Open: ``allow()`` is
False until the cool-down ends, then one probe call passes (half-open). A successful probe
closes it; a failed one reopens it with the cool-down doubled (up to ``max_cooldown_s``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import Enum


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, failure_threshold: int = 3, cooldown_s: float = 2.0,
                 max_cooldown_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1 or cooldown_s <= 0 or max_cooldown_s < cooldown_s:
            raise ValueError("need failure_threshold >= 1 and 0 < cooldown_s <= max_cooldown_s")
        self.failure_threshold, self.base_cooldown_s = failure_threshold, cooldown_s
        self.max_cooldown_s, self._clock = max_cooldown_s, clock
        self._lock = threading.Lock()
        self._failures = 0
        self._cooldown_s = cooldown_s
        self._open_until = 0.0
        self._state = BreakerState.CLOSED
        self.opened = 0   # times it opened, for metrics

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.OPEN and self._clock() >= self._open_until:
                self._state = BreakerState.HALF_OPEN   # this caller is the probe
                return True
            return False

    def success(self) -> None:
        with self._lock:
            self._failures = 0
            self._cooldown_s = self.base_cooldown_s
            self._state = BreakerState.CLOSED

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._state is BreakerState.HALF_OPEN:
                self._cooldown_s = min(self._cooldown_s * 2, self.max_cooldown_s)
                self._open()
            elif self._state is BreakerState.CLOSED and self._failures >= self.failure_threshold:
                self._open()

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._open_until = self._clock() + self._cooldown_s
        self.opened += 1
