"""Kernel tests: on a machine without CUDA, Triton kernels run under its interpreter.

Triton reads ``TRITON_INTERPRET`` when a ``@triton.jit`` function is decorated and again when
it launches, so the variable is set here, at collection time, before any
``sgl_kvext_kernels.jit`` module is imported (the wrappers import them lazily). The root
conftest removes it around every test outside this folder, so the SGLang servers those tests
start never inherit it.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the Triton variant of each kernel runs: CUDA when present, else the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
