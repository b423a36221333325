"""Opens and closes :data:`sgl_kvext.scheduler_turn.GATE` around the scheduler's forwards:
background threads of the scheduler's process wait at it while the scheduler works between
two forwards (see :mod:`sgl_kvext.scheduler_turn`)."""

from __future__ import annotations

from sgl_kvext.scheduler_turn import GATE
from sgl_kvext.sglang_plugin.surface import HOOK_ON_IDLE, HOOK_RUN_BATCH, HookRegistry, HookType

_registered = False


def register_hooks() -> None:
    """Close the gate after each ``run_batch``, open it for the next or an idle pass (once
    per process)."""
    global _registered
    if not _registered:
        HookRegistry.register(HOOK_RUN_BATCH, GATE.around_run_batch, HookType.AROUND)
        HookRegistry.register(HOOK_ON_IDLE, GATE.around_on_idle, HookType.AROUND)
        _registered = True
