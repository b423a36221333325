"""ForwardGate: background model work waits while the scheduler works between forwards, never
on the scheduler thread, never longer than its bound, and goes on while a forward runs or the
scheduler idles."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from sgl_kvext.scheduler_turn import ForwardGate

pytestmark = pytest.mark.unit


def _timed_pause(gate: ForwardGate) -> float:
    """Seconds one pause took on a thread of its own (a worker's)."""
    took: list[float] = []

    def worker() -> None:
        t0 = time.monotonic()
        gate.pause()
        took.append(time.monotonic() - t0)

    t = threading.Thread(target=worker)
    t.start()
    t.join(timeout=5)
    return took[0]


def test_the_gate_is_open_until_a_forward_ends_and_then_waits_at_most_its_bound() -> None:
    gate = ForwardGate(max_wait_s=0.2)
    assert _timed_pause(gate) < 0.05 and gate.waits == 0      # before any forward: open
    assert gate.around_run_batch(lambda s, x: x + 1, None, 1) == 2
    assert 0.2 <= _timed_pause(gate) < 1.0                    # between forwards: the bound
    assert gate.waits == 1


@pytest.mark.parametrize("opener", ["run_batch", "on_idle"])
def test_a_forward_or_an_idle_pass_lets_a_waiting_worker_on(opener: str) -> None:
    gate = ForwardGate(max_wait_s=1.0)
    gate.around_run_batch(lambda s: None, None)               # closed now
    inside: list[bool] = []

    def forward(_s: object) -> None:
        time.sleep(0.3)                                       # the worker is let on meanwhile
        inside.append(True)

    def open_soon() -> None:
        time.sleep(0.1)
        if opener == "run_batch":
            gate.around_run_batch(forward, None)
        else:
            gate.around_on_idle(lambda s: None, None)

    t = threading.Thread(target=open_soon)
    t.start()
    took = _timed_pause(gate)
    t.join(timeout=5)
    assert 0.05 <= took < 0.3, took                           # let on before the forward ended
    assert inside == ([True] if opener == "run_batch" else [])


def test_the_scheduler_thread_never_waits_at_its_own_gate() -> None:
    gate = ForwardGate(max_wait_s=1.0)
    gate.around_run_batch(lambda s: None, None)               # this thread ran the forward
    t0 = time.monotonic()
    gate.pause()
    assert time.monotonic() - t0 < 0.05 and gate.waits == 0
    assert _timed_pause(gate) >= 1.0                          # another thread does wait


def test_a_bound_out_of_range_is_refused() -> None:
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="max_wait_s"):
            ForwardGate(bad)


def test_the_scheduler_never_waits_for_tier_work_it_started(tmp_path: Path) -> None:
    # A load on the scheduler thread reads the disk tier through its pool: the pool's threads
    # must not wait at the gate the scheduler holds closed; a background caller (a writer,
    # the prefetcher) does wait before it starts.
    from sgl_kvext import scheduler_turn
    from sgl_kvext.tiers.disk import DiskTier

    gate = scheduler_turn.GATE
    disk = DiskTier(tmp_path / "disk", 1 << 30, bytes(32), codec="none")
    try:
        gate.around_run_batch(lambda s: None, None)           # this thread is the scheduler
        before = gate.waits
        assert disk.get([bytes(16)] * 8) == {}                # eight reads on the pool
        assert gate.waits == before
        background = threading.Thread(target=disk.get, args=([bytes(16)],))
        background.start()
        background.join(timeout=5)
        assert gate.waits == before + 1
    finally:
        gate.around_on_idle(lambda s: None, None)             # open again for other tests
        disk.close()


def test_pool_work_pauses_as_its_caller_would() -> None:
    # on_behalf wraps a function on the calling thread; on a pool thread it pauses as that
    # caller would: never for the scheduler (which waits for it), the bound for a worker.
    gate = ForwardGate(max_wait_s=0.2)
    gate.around_run_batch(lambda s: None, None)               # this thread is the scheduler
    for_scheduler = gate.on_behalf(lambda: _timed(gate.pause))
    assert _on_thread(for_scheduler) < 0.05 and gate.waits == 0
    for_worker: list[float] = []
    t = threading.Thread(target=lambda: for_worker.append(
        _on_thread(gate.on_behalf(lambda: _timed(gate.pause)))))
    t.start()
    t.join(timeout=5)
    assert 0.2 <= for_worker[0] < 1.0 and gate.waits == 1
    assert _on_thread(lambda: _timed(gate.pause)) >= 0.2      # the pool thread's own: waits


def _timed(fn: object) -> float:
    t0 = time.monotonic()
    fn()  # type: ignore[operator]
    return time.monotonic() - t0


def _on_thread(fn: object) -> float:
    """What ``fn`` returns, run on a new thread (a pool's)."""
    out: list[float] = []
    t = threading.Thread(target=lambda: out.append(fn()))  # type: ignore[operator]
    t.start()
    t.join(timeout=5)
    return out[0]
