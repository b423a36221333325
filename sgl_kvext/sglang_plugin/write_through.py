"""Write-through without copying on the scheduler thread.

With ``--kvext-write-policy write_through`` a finished request's pages are stored at once.
Copying them out of the device pool (~20 ms for a 700-token prompt on a 2-core CPU, and the
host tier's put) ran between two forward passes and stalled every running request; here it
runs on a :class:`~sgl_kvext.pages.write_behind.WriteBehind` worker while the request's tree
node stays locked on the device (as SGLang's HiCache keeps a node locked while its write to
host is in flight), so its slots cannot be reused before they are copied.

Every method runs on the scheduler thread (they lock and unlock tree nodes). Locked nodes are
released on the next scheduling step after their copy ends; when an eviction needs more than
the unlocked tree holds, the copies not yet started are dropped and their nodes unlocked (their
pages are stored when they are evicted, like any node's), and the running one is waited for.
A cache reset waits for the copies; one still running after that stores nothing (its slots
may be reused), and its node, gone with the old tree, is never unlocked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from sgl_kvext.pages.keys import Tenant
from sgl_kvext.pages.plans import SpillJob
from sgl_kvext.pages.tiering import KVTiering
from sgl_kvext.pages.write_behind import WriteBehind

#: Longest an eviction waits for the running copy (a few pages: milliseconds).
ROOM_WAIT_S = 2.0
#: Longest a cache reset or shutdown waits for the queued copies.
DRAIN_S = 10.0


class _Locked(NamedTuple):
    """A node locked for ``job``'s copy, in the tree of ``epoch`` (bumped by each reset)."""

    epoch: int
    node: Any
    job: SpillJob


class WriteThrough:
    """Stores finished paths in the background, their tree nodes locked meanwhile.

    Parameters
    ----------
    tiering
        Where pages go.
    lock, unlock
        The tree's ``inc_lock_ref`` / ``dec_lock_ref`` (a locked node is never evicted).
    """

    def __init__(self, tiering: KVTiering, lock: Callable[[Any], object],
                 unlock: Callable[[Any], object]) -> None:
        self._tiering, self._lock, self._unlock = tiering, lock, unlock
        self._epoch = 0
        self._writer: WriteBehind[_Locked] = WriteBehind(self._store)

    @property
    def counters(self) -> dict[str, int]:
        return dict(self._writer.counters)

    def store(self, tenant: Tenant, tokens: list[int], slots: torch.Tensor, node: Any) -> None:
        """Store the path ``tokens`` (KV in ``slots``) ending at ``node``: queued with
        ``node`` locked, or copied here when the queue is full."""
        self.release()
        job = self._tiering.prepare_spill(tenant, tokens, slots, 0)
        if job is None:
            return
        self._lock(node)
        if not self._writer.submit(job, _Locked(self._epoch, node, job)):
            self._unlock(node)
            self._tiering.store(job)

    def release(self) -> None:
        """Unlock the nodes whose pages are stored."""
        self._unlock_all(self._writer.done())

    def make_room(self, needed: int, evictable: Callable[[], int]) -> None:
        """Before evicting ``needed`` tokens: unlock what the copies still hold if the
        tree's unlocked part (``evictable()``) is short."""
        self.release()
        if not self._writer.pending or evictable() >= needed:
            return
        self._drop(self._writer.cancel_queued())
        if evictable() < needed:
            self._writer.wait_running(ROOM_WAIT_S)
        self.release()

    def reset(self) -> None:
        """The tree and the pool are about to be reset: finish the copies, unlock."""
        self._writer.wait(DRAIN_S)
        self.release()
        self._drop(self._writer.cancel_queued())
        self._epoch += 1

    def close(self) -> None:
        """Stop the worker after the queued copies (shutdown)."""
        self._writer.wait(DRAIN_S)
        self.release()
        self._drop(self._writer.cancel_queued())
        self._unlock_all(self._writer.close(DRAIN_S))

    def _unlock_all(self, locked: list[_Locked]) -> None:
        for entry in locked:
            if entry.epoch == self._epoch:
                self._unlock(entry.node)

    def _drop(self, locked: list[_Locked]) -> None:
        """Copies that will not run (or may not have): their pages are spilled again."""
        for entry in locked:
            self._tiering.unmark(entry.job)
        self._unlock_all(locked)

    def _store(self, job: SpillJob, locked: _Locked) -> int:      # the worker thread
        try:
            return self._tiering.store(job, intact=lambda: locked.epoch == self._epoch)
        except Exception:
            self._tiering.unmark(job)
            raise
