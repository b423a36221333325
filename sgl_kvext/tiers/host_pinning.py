"""Page-locking host memory in place for DMA (``cudaHostRegister``), at its exact size.

torch's ``pin_memory=True`` goes through its caching host allocator, which rounds every
block up to a power of two and keeps it for reuse: a 5 GiB pool pinned 8 GiB. Registering
an existing mapping pins exactly its bytes; torch then treats tensors over it as pinned
(``is_pinned()``), so copies between them and CUDA tensors are asynchronous DMA.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger("sgl_kvext")
_PORTABLE = 1    # cudaHostRegisterPortable: pinned for every CUDA context of the process


def _cudart():  # type: ignore[no-untyped-def]
    """torch's CUDA runtime bindings, or None without torch or a CUDA device."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.cudart() if torch.cuda.is_available() else None


def _ok(result: object) -> bool:
    return getattr(result, "value", result) == 0    # cudaSuccess


def pin_host_memory(array: np.ndarray) -> bool:
    """Page-lock ``array``'s bytes (contiguous) for CUDA DMA; False without CUDA or when the
    driver refuses (then the memory is used unpinned, logged once per call)."""
    cudart = _cudart()
    if cudart is None or array.nbytes == 0:
        return False
    if not array.flags.c_contiguous:
        raise ValueError("only contiguous host memory can be page-locked")
    result = cudart.cudaHostRegister(array.ctypes.data, array.nbytes, _PORTABLE)
    if not _ok(result):
        logger.warning("sgl-kvext: page-locking %d bytes of host memory failed (%s); the "
                       "host tier copies through pageable memory", array.nbytes, result)
        return False
    return True


def unpin_host_memory(array: np.ndarray) -> None:
    """Undo :func:`pin_host_memory` for the same ``array``."""
    cudart = _cudart()
    if cudart is not None:
        cudart.cudaHostUnregister(array.ctypes.data)
