"""Triton kernels for sgl-kvext (a leaf package: it imports only torch and triton).

Each kernel comes in three parts: the ``@triton.jit`` code (``jit/``), a validating wrapper
that raises real exceptions for a wrong device, dtype, shape or layout (this package), and a
pure-torch reference that is also the CPU path (``reference/``). ``backend="auto"`` runs
Triton on CUDA tensors and torch elsewhere.
"""

from sgl_kvext_kernels.deviation import DeviationSelection, kv_deviation, select_top_deviation
from sgl_kvext_kernels.rope import Llama3RopeScaling, RopeConfig, inv_freq, rerotate_k
from sgl_kvext_kernels.subset_attention import subset_attention

__all__ = ["DeviationSelection", "Llama3RopeScaling", "RopeConfig", "inv_freq", "kv_deviation",
           "rerotate_k", "select_top_deviation", "subset_attention"]
