"""SGLang integration: the only part of sgl-kvext that imports sglang.

SGLang calls :func:`load` (entry point group ``sglang.srt.plugins``) early in every process
it starts: the launcher before it parses arguments, then the scheduler, detokenizer and
engine processes. Each call is cheap after the first and never changes SGLang's behaviour
unless ``--enable-hierarchical-kv`` (or ``--radix-cache-backend kvext``) asks for it. Two
things exist without the flag: the ``sgl_kernel`` fallback, which only acts where SGLang could
not start at all, and the ``kvext_cpu`` attention backend, which only ``--attention-backend
kvext_cpu`` selects.
"""

from __future__ import annotations

import logging

from sgl_kvext.sglang_plugin.kernel_fallback import KernelSource, ensure_sgl_kernel

logger = logging.getLogger("sgl_kvext")

#: Name under which the tree cache is registered with SGLang's radix-cache registry.
BACKEND_NAME = "kvext"


def load() -> None:
    """Plugin entry point: sgl_kernel fallback, server flags, tree-cache and attention backends."""
    status = ensure_sgl_kernel()
    if status.source is KernelSource.FALLBACK and status.reason != "already active":
        logger.info("sgl-kvext: sgl_kernel unavailable (%s); using torch CPU ops", status.reason)

    from sgl_kvext.sglang_plugin import (
        backend,
        blend_jobs,
        cpu_attention,
        forward_gate,
        prewarm,
        request_mode,
        scheduler_gaps,
        server_flags,
    )

    server_flags.register_hooks()
    request_mode.register_hooks()
    prewarm.register_hooks()
    scheduler_gaps.register_hooks()
    blend_jobs.register_hooks()
    forward_gate.register_hooks()
    backend.register_backend(BACKEND_NAME)
    cpu_attention.register()
