"""SchedulerGaps: forwards and the gaps between them, a gap after an idle loop not counted."""

from __future__ import annotations

import time

import pytest

from sgl_kvext.sglang_plugin.scheduler_gaps import SLOW_GAP_S, SchedulerGaps, handle

pytestmark = pytest.mark.unit


class _Scheduler:
    """Stands in for SGLang's Scheduler: only the flag the meter reads."""

    def __init__(self) -> None:
        self._sched_idled = False


def _forward(seconds: float) -> str:
    time.sleep(seconds)
    return "result"


def test_gaps_between_forwards_count_only_without_an_idle_loop_between() -> None:
    gaps, sched = SchedulerGaps(), _Scheduler()
    assert gaps.around_run_batch(lambda s, d: _forward(d), sched, 0.01) == "result"
    time.sleep(SLOW_GAP_S + 0.02)                        # the scheduler busy between forwards
    gaps.around_run_batch(lambda s, d: _forward(d), sched, 0.0)
    busy = gaps.report()
    assert busy.batches == 2 and busy.slow_gaps == 1
    assert SLOW_GAP_S + 0.02 <= busy.longest_gap_s < 1.0
    assert 0.01 <= busy.longest_forward_s <= busy.forward_s

    gaps.reset()
    time.sleep(SLOW_GAP_S + 0.02)
    sched._sched_idled = True                            # nothing to run: nobody waited
    gaps.around_run_batch(lambda s: _forward(0.0), sched)
    idle = gaps.report()
    assert idle.batches == 1 and idle.longest_gap_s == 0.0 and idle.slow_gaps == 0


def test_the_longest_gap_names_the_timed_work_in_it() -> None:
    gaps, sched = SchedulerGaps(), _Scheduler()
    gaps.around_run_batch(lambda s: _forward(0.0), sched)
    with gaps.timed("load"):
        time.sleep(0.01)
    gaps.around_run_batch(lambda s: _forward(0.0), sched)     # a short gap: a 10 ms load
    with gaps.timed("write_through"):
        time.sleep(0.03)
    with gaps.timed("write_through"):
        time.sleep(0.01)
    time.sleep(0.01)                                          # untimed work in the gap too
    gaps.around_run_batch(lambda s: _forward(0.0), sched)     # the longest gap
    report = gaps.report()
    assert set(report.longest_gap_parts) == {"write_through"}
    assert 0.04 <= report.longest_gap_parts["write_through"] < report.longest_gap_s
    gaps.reset()
    assert gaps.report().longest_gap_parts == {}


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_gap_tells_waiting_from_computing_by_the_scheduler_threads_cpu_clock() -> None:
    gaps, sched = SchedulerGaps(), _Scheduler()
    gaps.around_run_batch(lambda s: _forward(0.0), sched)
    with gaps.timed("admit"):
        time.sleep(0.08)                                  # waits: no CPU of this thread
    gaps.around_run_batch(lambda s: _forward(0.0), sched)
    waited = gaps.report()
    assert waited.longest_gap_s >= 0.08 and waited.longest_gap_cpu_s < 0.04
    assert waited.longest_gap_parts_cpu["admit"] < 0.04 <= waited.longest_gap_parts["admit"]

    gaps.reset()
    with gaps.timed("admit"):
        _spin(0.08)                                       # computes on this thread
    gaps.around_run_batch(lambda s: _forward(0.0), sched)
    busy = gaps.report()
    assert busy.longest_gap_cpu_s >= 0.08 and busy.longest_gap_parts_cpu["admit"] >= 0.08
    assert busy.longest_gap_cpu_s <= busy.longest_gap_s + 0.01
    assert 0.0 <= busy.longest_gap_runq_s <= busy.longest_gap_s - busy.longest_gap_cpu_s + 0.01


def test_a_failing_forward_is_timed_and_raised() -> None:
    gaps, sched = SchedulerGaps(), _Scheduler()

    def boom(s: object) -> None:
        raise RuntimeError("forward failed")

    with pytest.raises(RuntimeError, match="forward failed"):
        gaps.around_run_batch(boom, sched)
    assert gaps.report().batches == 1


def test_the_control_method_reports_then_resets() -> None:
    first = handle({"reset": True})
    assert set(first) == {"batches", "longest_gap_s", "slow_gaps", "longest_forward_s",
                          "forward_s", "window_s", "longest_gc_s", "gc_s",
                          "longest_gap_parts", "longest_gap_cpu_s", "longest_gap_runq_s",
                          "longest_gap_parts_cpu"}
    assert handle({})["batches"] == 0
    with pytest.raises(ValueError, match="reset must be true or false"):
        handle({"reset": 1})


def test_garbage_collections_are_timed() -> None:
    import gc

    gaps = SchedulerGaps()
    gc.callbacks.append(gaps.on_gc)
    try:
        garbage = []
        for _ in range(20_000):            # cycles only the collector frees
            a: list[object] = []
            a.append(a)
            garbage.append(a)
        del garbage, a
        gc.collect()
    finally:
        gc.callbacks.remove(gaps.on_gc)
    report = gaps.report()
    assert 0.0 < report.longest_gc_s <= report.gc_s < 5.0
    gaps.reset()
    assert gaps.report().gc_s == 0.0
