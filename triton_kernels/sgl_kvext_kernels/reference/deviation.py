"""Pure-torch KV deviation: the oracle for the kernel and the CPU path.

Inputs are assumed validated by :func:`sgl_kvext_kernels.deviation.kv_deviation`.
"""

from __future__ import annotations

import torch


def kv_deviation_ref(cached: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """Per-token squared L2 distance, accumulated in float32.

    Parameters
    ----------
    cached, fresh : Tensor [n_tokens, n_heads, head_dim]
        Same shape, dtype and device.

    Returns
    -------
    Tensor [n_tokens]
        float32, ``sum over heads and dims of (fresh - cached) ** 2``.
    """
    diff = fresh.float() - cached.float()
    return (diff * diff).sum(dim=(1, 2))
