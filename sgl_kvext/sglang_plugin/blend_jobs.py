"""Blended prefills off the scheduler thread: a blend-namespace request waits in SGLang's queue
while its blend runs on the blend worker, so the requests already running keep their forwards
(a blend on the scheduler thread stopped every running request for its whole recompute: 2.18
s in one stall-bench run, docs/reliability.md).

One job per waiting request: the plan it computes, the device node whose prefix KV the worker
reads, and the future of its output. Invariant: a job's node holds one lock reference taken by
:meth:`BlendJobs.poll` when the job starts and given back exactly once, by :meth:`take`,
:meth:`drop` or a :meth:`poll` that replaces the job (so the prefix's slots cannot be evicted
and reused while the worker reads them; a dropped job's output is never read). Every method
but :meth:`BlendJobs.wait` returns at once; all run on the scheduler thread.

A waiting request is matched again on every scheduler pass, and with nothing else to run
SGLang's loop spins: its Python holds the GIL the worker needs between two torch calls (a
~700-token blend took 5 minutes so). So a pass with nothing to run (``Scheduler.on_idle``)
waits up to :data:`IDLE_WAIT_S` for the running blend, and a request whose blend was started
from the same device match is not planned again (:meth:`BlendJobs.started`).
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

from sgl_kvext.fragments.blender import BlendOutput, BlendPlan, NoBlend
from sgl_kvext.sglang_plugin.surface import HOOK_ON_IDLE, HookRegistry, HookType

#: Longest an idle scheduler pass waits for the running blend (a request arriving meanwhile
#: is received this much later; the blend's finish ends the wait at once).
IDLE_WAIT_S = 0.010
#: Blends started and not yet taken, at most: each finished one holds its span's KV (~140 MB
#: for 3k tokens in float32) until SGLang admits its request. Later requests wait to start.
MAX_JOBS = 4


class Running(NamedTuple):
    """The blend is still computing: keep the request queued."""


class Ready(NamedTuple):
    """The blend finished (``NoBlend``: nothing blended, the report says why)."""

    output: BlendOutput | NoBlend


class _Job(NamedTuple):
    node: Any
    plan: BlendPlan
    future: cf.Future[BlendOutput | NoBlend]


def _same(a: BlendPlan, b: BlendPlan) -> bool:
    return (a.start, a.end, a.fragments) == (b.start, b.end, b.fragments)


class BlendJobs:
    """The running and finished blends of waiting requests.

    Parameters
    ----------
    lock, unlock
        The tree's lock-reference calls (``inc_lock_ref`` / ``dec_lock_ref``) for a job's node.
    """

    def __init__(self, lock: Callable[[Any], object], unlock: Callable[[Any], object]) -> None:
        self._lock, self._unlock = lock, unlock
        self._jobs: dict[Hashable, _Job] = {}
        # Requests whose blend ended unblended (a close call, say): SGLang matches a waiting
        # request more than once a pass, and planning it again would start the same blend
        # again, forever. Kept until the request leaves (:meth:`forget`).
        self._settled: set[Hashable] = set()

    def __len__(self) -> int:
        return len(self._jobs)

    def started(self, request: Hashable, node: Any) -> BlendPlan | None:
        """The plan of ``request``'s job when it was started after ``node`` (the request's
        device match has not changed since: no need to plan again), else None."""
        job = self._jobs.get(request)
        return job.plan if job is not None and job.node is node else None

    def wait(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for a started blend to finish (GIL released); at once
        when none is unfinished. One queued behind a dropped blend counts: the worker is
        busy with that one meanwhile."""
        unfinished = [j.future for j in self._jobs.values() if not j.future.done()]
        if unfinished:
            cf.wait(unfinished, timeout=timeout_s, return_when=cf.FIRST_COMPLETED)

    def poll(self, request: Hashable, node: Any, plan: BlendPlan,
             start: Callable[[], cf.Future[BlendOutput | NoBlend]]) -> Running | Ready:
        """Where ``request``'s blend of ``plan`` after ``node`` stands; ``start`` submits it
        when no job of that plan and node exists (one of another plan is dropped first)."""
        job = self._jobs.get(request)
        if job is not None and (job.node is not node or not _same(job.plan, plan)):
            self.drop(request)
            job = None
        if job is None:
            if len(self._jobs) >= MAX_JOBS:
                return Running()
            self._lock(node)
            try:
                job = self._jobs[request] = _Job(node, plan, start())
            except BaseException:
                self._unlock(node)
                raise
        return Ready(job.future.result()) if job.future.done() else Running()

    def take(self, request: Hashable) -> BlendOutput | NoBlend | None:
        """The finished output of ``request``'s job, its node's lock given back; None when it
        has no finished job."""
        job = self._jobs.get(request)
        if job is None or not job.future.done():
            return None
        self.drop(request)
        out = job.future.result()
        if isinstance(out, NoBlend):
            self._settled.add(request)
        return out

    def settled(self, request: Hashable) -> bool:
        """Whether ``request``'s blend already ended unblended: it is computed as usual, not
        planned again."""
        return request in self._settled

    def forget(self, request: Hashable) -> None:
        """The request left: its job is dropped (:meth:`drop`) and its settlement forgotten."""
        self.drop(request)
        self._settled.discard(request)

    def drop(self, request: Hashable) -> None:
        """Forget ``request``'s job (a running one finishes unread) and unlock its node."""
        job = self._jobs.pop(request, None)
        if job is not None:
            job.future.cancel()             # only stops one still queued behind another
            self._unlock(job.node)

    def clear(self) -> None:
        """Forget every job without unlocking: the tree was reset and its nodes are gone."""
        for job in self._jobs.values():
            job.future.cancel()
        self._jobs.clear()
        self._settled.clear()


def _idle_wait(original: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    """The ``Scheduler.on_idle`` hook: a pass with nothing to run waits for a running blend."""
    out = original(scheduler, *args, **kwargs)
    jobs = getattr(getattr(scheduler, "tree_cache", None), "blend_jobs", None)
    if isinstance(jobs, BlendJobs):
        jobs.wait(IDLE_WAIT_S)
    return out


_registered = False


def register_hooks() -> None:
    """Install the idle wait (once per process)."""
    global _registered
    if not _registered:
        HookRegistry.register(HOOK_ON_IDLE, _idle_wait, HookType.AROUND)
        _registered = True
