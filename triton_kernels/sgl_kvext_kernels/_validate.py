"""Input checks shared by the kernel wrappers: each raises a one-line ``ValueError`` or
``TypeError`` naming the argument, what it got and what is allowed (never ``assert``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    contiguous: bool = False,
) -> torch.Tensor:
    """Check type, rank, dtype and (optionally) contiguity of one argument; return it typed."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} has dtype {t.dtype}; allowed: {allowed}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    return t


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; return it."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n}={d}" for n, d in devices.items())
        raise ValueError(f"tensors must share one device, got {listing}")
    return first


def check_dim(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    """``t.shape[dim] == expected``, where ``what`` names the expected size."""
    if t.shape[dim] != expected:
        raise ValueError(
            f"{name}.shape[{dim}] must equal {what} ({expected}), got shape {tuple(t.shape)}"
        )


def resolve_backend(backend: str, device: torch.device) -> Literal["triton", "torch"]:
    """``auto`` -> Triton on CUDA, torch elsewhere. ``triton`` on a CPU tensor needs
    ``TRITON_INTERPRET=1`` set before the first kernel launch (the tests do that)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return "triton" if backend == "triton" else "torch"
