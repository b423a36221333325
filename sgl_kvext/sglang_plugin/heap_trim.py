"""Hand the C heap's free pages back to the OS now and then (glibc ``malloc_trim``).

A CPU prefill allocates activation buffers of tens of MiB whose sizes change with every
prompt. glibc keeps freed ones in its heaps for reuse (its mmap threshold climbs to 32 MiB
after the first large free) and never returns the free holes between live chunks, so a
server's resident set climbs over hours although its live memory does not.
``malloc_trim(0)`` releases every free page inside the heaps (``MADV_DONTNEED``; the
addresses stay valid and fault back in on reuse). :class:`HeapTrimmer` calls it at most
once per interval, from the thread that owns the work (the scheduler, after a request is
released, so never inside a forward pass). Fixing glibc's mmap threshold instead would map
and fault every large buffer on each allocation: it cost ~30% of a soak's requests.

Where the C library is not glibc (musl, or jemalloc / tcmalloc preloaded) there is no
``malloc_trim`` to call, or it has nothing to release: the trimmer then does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class HeapTrimmer:
    """Calls ``malloc_trim(0)`` at most once per ``interval_s``.

    Parameters
    ----------
    interval_s
        Least seconds between two trims (a trim of a few GiB of heap takes milliseconds).
    clock
        Seconds, monotonic (tests pass their own).
    """

    def __init__(self, interval_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        self.interval_s = interval_s
        self._clock = clock
        self._trim = _glibc_malloc_trim()
        self._last = clock()
        self.trims = 0

    @property
    def available(self) -> bool:
        """Whether this process's C library has ``malloc_trim``."""
        return self._trim is not None

    def maybe_trim(self) -> bool:
        """Trim when the interval has passed since the last trim; True when it trimmed."""
        now = self._clock()
        if self._trim is None or now - self._last < self.interval_s:
            return False
        self._last = now
        self._trim(0)
        self.trims += 1
        return True
