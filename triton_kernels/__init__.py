"""Triton kernels for sgl-kvext (a leaf package: it imports only torch and triton).

Each kernel comes in three parts: the ``@triton.jit`` code, a validating wrapper that raises
real exceptions for a wrong device, dtype, shape or layout, and a pure-torch reference that
is also the CPU path. The CacheBlend kernels (RoPE re-rotation, KV deviation with top-k,
paged gather/scatter, subset attention) arrive with the CacheBlend work.
"""
