"""``@triton.jit`` code only; imported lazily by the wrappers in :mod:`sgl_kvext_kernels`."""
