"""How long the scheduler went without running a batch while it had one to run.

A request's tokens come one scheduler pass apart: one forward (its own compute) plus whatever
the scheduler did between two forwards (receiving, scheduling, the tree's matches, tier loads,
blends, control messages, processing results). :class:`SchedulerGaps` times both from the
scheduler's own clock, around ``Scheduler.run_batch``; a gap counts only when the scheduler
did not idle in between (an idle loop has nothing to run, so nobody waits). The longest gap
is the longest stall any running request saw beyond its batch's compute; the longest forward
shows compute slowed by something sharing the cores. Python's garbage collections are timed
too (they stop every thread of the process, the scheduler's included). The tree's own work
between forwards is timed by part (:meth:`SchedulerGaps.timed`: tier admission, spills, loads,
blends), and so are the scheduler loop's phases (``sglang.*``: receiving requests, choosing
the next batch, processing a result). The longest gap reports its parts, so a stall names
what filled it; parts nest (an admission runs inside ``sglang.get_next_batch_to_run``).
Each gap and part is also timed on the scheduler thread's CPU clock, and the gap's time
runnable but not running (Linux ``/proc/thread-self/schedstat``: waiting for a core) is
read too: a gap's wall time is its CPU time, its wait for a core, and the rest blocked (on
the GIL another thread of the process held, a lock, I/O).
SGLang's overlap loop (its default, on CPU too; the harness turns it off on CPU) processes a
batch's result after launching the next forward, so that work lands in the gap after; a gap
may hold no result processing.

``POST /kvext/scheduler`` answers :meth:`SchedulerGaps.report` (``{"reset": true}`` starts a
new window), so a benchmark can measure each load from the server's side.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from sgl_kvext.sglang_plugin.surface import (
    HOOK_GAP_PHASES,
    HOOK_RUN_BATCH,
    HookRegistry,
    HookType,
)

METHOD = "kvext.scheduler"
#: Gaps longer than this are counted apart (the stall budget, docs/reliability.md).
SLOW_GAP_S = 0.050


class GapReport(NamedTuple):
    """One window of scheduler passes (seconds)."""

    batches: int
    longest_gap_s: float
    slow_gaps: int              # gaps over SLOW_GAP_S
    longest_forward_s: float
    forward_s: float            # all forwards together
    window_s: float
    longest_gc_s: float         # Python's longest garbage collection (any generation)
    gc_s: float                 # all collections together
    longest_gap_parts: dict[str, float]   # timed work in the longest gap, by part (they nest)
    longest_gap_cpu_s: float    # the scheduler thread's CPU time in the longest gap
    longest_gap_runq_s: float   # ... its time waiting for a core (0 where Linux does not say)
    longest_gap_parts_cpu: dict[str, float]   # ... and in each of its parts


class _Gap(NamedTuple):
    """One gap between forwards: its wall seconds, the scheduler thread's CPU seconds and
    seconds waiting for a core; wall and CPU seconds by part."""

    wall_s: float
    cpu_s: float
    runq_s: float
    parts: dict[str, float]
    parts_cpu: dict[str, float]


class SchedulerGaps:
    """Times the scheduler's forwards and the gaps between them (one scheduler per process).

    Invariant: a gap is the time from one forward's end to the next one's start, taken only
    when the scheduler did not idle between them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_end = self._last_end_cpu = self._last_end_runq = 0.0
        # scheduler thread only: the current gap's parts, wall and CPU seconds
        self._parts: dict[str, float] = {}
        self._parts_cpu: dict[str, float] = {}
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._window_start = time.monotonic()
            self._batches, self._slow = 0, 0
            self._longest_gap = self._longest_forward = self._forward = 0.0
            self._longest_gc = self._gc = 0.0
            self._longest_parts: dict[str, float] = {}
            self._longest_parts_cpu: dict[str, float] = {}
            self._longest_gap_cpu = self._longest_gap_runq = 0.0

    def around_run_batch(self, original: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
        """The ``Scheduler.run_batch`` hook: times it and the gap before it."""
        idled = bool(getattr(scheduler, "_sched_idled", True))   # read before run_batch clears it
        parts, self._parts = self._parts, {}
        parts_cpu, self._parts_cpu = self._parts_cpu, {}
        start, start_cpu, start_runq = time.monotonic(), time.thread_time(), _runq_s()
        try:
            return original(scheduler, *args, **kwargs)
        finally:
            end = time.monotonic()
            gap = None if idled or not self._last_end else _Gap(
                start - self._last_end, start_cpu - self._last_end_cpu,
                start_runq - self._last_end_runq, parts, parts_cpu)
            self._record(start, end, gap)
            self._last_end, self._last_end_cpu = end, time.thread_time()
            self._last_end_runq = _runq_s()

    @contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Time scheduler-thread work between two forwards as ``part`` of the gap it falls
        in (work inside a forward lands in the next gap: callers time only what runs
        between forwards)."""
        start, start_cpu = time.monotonic(), time.thread_time()
        try:
            yield
        finally:
            self._parts[part] = self._parts.get(part, 0.0) + time.monotonic() - start
            self._parts_cpu[part] = (self._parts_cpu.get(part, 0.0)
                                     + time.thread_time() - start_cpu)

    def phase(self, part: str) -> Any:
        """An ``AROUND`` hook timing a scheduler-loop method as ``part`` (see :meth:`timed`)."""
        def around(original: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
            with self.timed(part):
                return original(scheduler, *args, **kwargs)
        return around

    def _record(self, start: float, end: float, gap: _Gap | None) -> None:
        with self._lock:
            self._batches += 1
            self._forward += end - start
            self._longest_forward = max(self._longest_forward, end - start)
            if gap is not None and start >= self._window_start:
                if gap.wall_s > self._longest_gap:
                    self._longest_gap, self._longest_gap_cpu = gap.wall_s, gap.cpu_s
                    self._longest_gap_runq = gap.runq_s
                    self._longest_parts, self._longest_parts_cpu = gap.parts, gap.parts_cpu
                self._slow += gap.wall_s > SLOW_GAP_S

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        """A ``gc.callbacks`` entry: times each collection (no lock taken in ``start``)."""
        if phase == "start":
            self._gc_start = time.monotonic()
            return
        took = time.monotonic() - getattr(self, "_gc_start", time.monotonic())
        with self._lock:
            self._gc += took
            self._longest_gc = max(self._longest_gc, took)

    def report(self) -> GapReport:
        with self._lock:
            return GapReport(self._batches, self._longest_gap, self._slow,
                             self._longest_forward, self._forward,
                             time.monotonic() - self._window_start, self._longest_gc,
                             self._gc, dict(self._longest_parts), self._longest_gap_cpu,
                             self._longest_gap_runq, dict(self._longest_parts_cpu))


def _runq_s() -> float:
    """Seconds the calling thread has been runnable without a core (Linux schedstat's
    run_delay); 0.0 where the kernel does not say."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


#: The scheduler process's meter (SGLang runs one scheduler per process).
GAPS = SchedulerGaps()
_registered = False


def register_hooks() -> None:
    """Time every ``run_batch`` and every garbage collection (clock reads: no change to
    what the scheduler does)."""
    global _registered
    if not _registered:
        HookRegistry.register(HOOK_RUN_BATCH, GAPS.around_run_batch, HookType.AROUND)
        for part, target in HOOK_GAP_PHASES.items():
            HookRegistry.register(target, GAPS.phase(part), HookType.AROUND)
        gc.callbacks.append(GAPS.on_gc)
        _registered = True


def handle(body: dict[str, Any]) -> dict[str, Any]:
    """The control method: this window's report, then a new window if ``reset`` is true."""
    reset = body.get("reset", False)
    if not isinstance(reset, bool):
        raise ValueError("reset must be true or false")
    report = GAPS.report()._asdict()
    if reset:
        GAPS.reset()
    return report
