"""Make SGLang's CPU engine importable on machines where the real ``sgl_kernel`` cannot load.

SGLang's scheduler and detokenizer are *spawned* processes that import ``sgl_kernel`` at
module import, before their own plugin loading, so a module placed in this process's
``sys.modules`` would not reach them. What does reach them: ``sys.path`` (multiprocessing's
spawn copies the parent's) and ``PYTHONPATH`` (inherited by any subprocess). So, only when
the real package fails to import and torch sees no CUDA device, the shim folder holding a
stand-in ``sgl_kernel`` goes first on both, and ``SGLANG_USE_CPU_ENGINE`` defaults to 1.
A working ``sgl_kernel`` (CUDA, or a CPU build) is never shadowed.
"""

from __future__ import annotations

import importlib
import sys
from enum import Enum
from pathlib import Path
from typing import NamedTuple

from sgl_kvext.config import env

SHIM_DIR = Path(__file__).resolve().parent / "_sgl_kernel_shim"


class KernelSource(Enum):
    REAL = "real"          # the installed sgl_kernel imports and is used
    FALLBACK = "fallback"  # sgl-kvext's torch ops stand in for it
    BROKEN = "broken"      # it fails on a CUDA machine: left for SGLang to report


class KernelStatus(NamedTuple):
    source: KernelSource
    reason: str


def _purge_modules() -> None:
    for name in [m for m in sys.modules if m == "sgl_kernel" or m.startswith("sgl_kernel.")]:
        del sys.modules[name]


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def ensure_sgl_kernel() -> KernelStatus:
    """Use the real ``sgl_kernel`` when it loads; otherwise, without CUDA, install the shim.

    Idempotent: a process that already imported the shim (a spawned scheduler) returns at once.
    """
    try:
        module = importlib.import_module("sgl_kernel")
        if getattr(module, "KVEXT_FALLBACK", False):  # a spawned process found the shim
            return KernelStatus(KernelSource.FALLBACK, "already active")
        return KernelStatus(KernelSource.REAL, "sgl_kernel imported")
    except Exception as exc:  # the real wheel raises ImportError or OSError without libcuda
        reason = _first_line(exc)
    _purge_modules()

    import torch

    if torch.cuda.is_available():
        return KernelStatus(KernelSource.BROKEN, reason)
    shim = str(SHIM_DIR)
    if shim in sys.path:
        sys.path.remove(shim)
    sys.path.insert(0, shim)
    env.prepend_pythonpath(SHIM_DIR)
    env.set_default("SGLANG_USE_CPU_ENGINE", "1")
    importlib.invalidate_caches()
    return KernelStatus(KernelSource.FALLBACK, reason)
