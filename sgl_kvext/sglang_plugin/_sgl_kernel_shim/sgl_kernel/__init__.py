"""Stand-in ``sgl_kernel`` for CPU-only machines, put first on the path by sgl-kvext.

Installed only when the real ``sgl_kernel`` cannot load (it needs libcuda) and no CUDA device
is present; see ``sgl_kvext/sglang_plugin/kernel_fallback.py``. It exposes the torch versions
of the ops SGLang's CPU engine imports. Ops it does not provide raise NotImplementedError naming
themselves when called; unknown names raise ImportError as a missing op would.
"""

from sgl_kvext.sglang_plugin.sgl_kernel_ops import (  # noqa: F401  (re-exported for SGLang)
    NOT_PROVIDED,
    assign_req_to_token_pool_cpu,
    copy_all_layer_kv_cache_cpu,
    not_provided,
    rmsnorm,
)

#: Marks this module as sgl-kvext's fallback (checked before installing it twice).
KVEXT_FALLBACK = True
__version__ = "0.0.0+sgl-kvext-cpu-fallback"


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    if name in NOT_PROVIDED:
        return not_provided(name)
    raise AttributeError(f"module 'sgl_kernel' (sgl-kvext CPU fallback) has no attribute {name!r}")
