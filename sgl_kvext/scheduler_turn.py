"""Background work in the scheduler's process yields the scheduler its turn: it runs while
the scheduler forwards or idles, and waits while the scheduler works between two forwards.

The fragment registration and blend workers run the model, and the tiers' S3 and disk
threads run boto3 and codecs, in the scheduler's process. Between two calls that release
the GIL they hold it (for boto3, milliseconds of Python per object), and each time the
scheduler thread releases it (a numpy or torch call, a contended lock) one of them takes it:
the scheduler, with a batch to run, then waits for it to come back (docs/reliability.md,
"What the gaps under tier traffic are made of"). So those threads pass :func:`pause` before
each layer step and each tier call they make (the calling thread pauses, never a pool thread
doing work a caller waits for: the scheduler's own tier reads must not wait at its own
gate): it returns at once while the scheduler
is inside ``run_batch`` (its forward releases the GIL for its kernels) or idle, and
otherwise waits, GIL released, until the next forward starts, the scheduler idles, or
``max_wait_s`` passes (a worker is slowed, never starved).

A pool thread doing a caller's work passes the gate as its caller would
(:func:`on_behalf`): never for the scheduler's own reads, and for a background caller at
each step of a long call too (the S3 tier pauses between the phases of every boto3 request:
parameters, signing, sending, parsing), so a background request started before the gate
closed holds the GIL for one phase at most.

Invariants: the gate is open unless the SGLang plugin's hooks
(:mod:`sgl_kvext.sglang_plugin.forward_gate`) close it, and closed only from the end of one
``run_batch`` to the next pass's ``run_batch`` or ``on_idle``; the scheduler thread itself
never waits at it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

#: Longest one pause waits (a scheduler busy between forwards longer than this lets the
#: workers on; the stall goal is 50 ms, docs/reliability.md).
MAX_WAIT_S = 0.050


class ForwardGate:
    """Open while the scheduler forwards or idles; closed between its forwards."""

    def __init__(self, max_wait_s: float = MAX_WAIT_S) -> None:
        if not 0.0 <= max_wait_s <= 1.0:
            raise ValueError(f"max_wait_s {max_wait_s} must be in [0, 1]")
        self.max_wait_s = max_wait_s
        self._open = threading.Event()
        self._open.set()
        self._scheduler: int | None = None       # the scheduler thread's ident, once seen
        self._for_scheduler = threading.local()  # .on: this thread works for the scheduler
        self.waits = 0                           # pauses that found the gate closed

    def pause(self) -> None:
        """Wait (GIL released) while the scheduler works between forwards, at most
        ``max_wait_s``; at once on the scheduler thread or while the gate is open."""
        if self._open.is_set() or self._serves_scheduler():
            return
        self.waits += 1
        self._open.wait(self.max_wait_s)

    def on_behalf(self, fn: Callable[P, T]) -> Callable[P, T]:
        """``fn`` to run on a pool thread as the calling thread's work: its pauses return at
        once if the caller is the scheduler (which waits for it), and wait as the caller's
        would otherwise. Call this on the calling thread."""
        for_scheduler = self._serves_scheduler()

        def run(*args: P.args, **kwargs: P.kwargs) -> T:
            before = getattr(self._for_scheduler, "on", False)
            self._for_scheduler.on = for_scheduler
            try:
                return fn(*args, **kwargs)
            finally:
                self._for_scheduler.on = before
        return run

    def _serves_scheduler(self) -> bool:
        return (threading.get_ident() == self._scheduler
                or getattr(self._for_scheduler, "on", False))

    def around_run_batch(self, original: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
        """The ``Scheduler.run_batch`` hook: open for the forward, closed after it."""
        self._scheduler = threading.get_ident()
        self._open.set()
        try:
            return original(scheduler, *args, **kwargs)
        finally:
            self._open.clear()

    def around_on_idle(self, original: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
        """The ``Scheduler.on_idle`` hook: nothing to run, the workers may go on."""
        self._open.set()
        return original(scheduler, *args, **kwargs)


#: The process's gate (SGLang runs one scheduler per process).
GATE = ForwardGate()


def pause() -> None:
    """:meth:`ForwardGate.pause` of :data:`GATE`."""
    GATE.pause()


def on_behalf(fn: Callable[P, T]) -> Callable[P, T]:
    """:meth:`ForwardGate.on_behalf` of :data:`GATE`."""
    return GATE.on_behalf(fn)
