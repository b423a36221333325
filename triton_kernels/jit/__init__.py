"""``@triton.jit`` code only; imported lazily by the wrappers in :mod:`triton_kernels`."""
