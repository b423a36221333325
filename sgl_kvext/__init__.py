"""sgl-kvext: a hierarchical KV cache and CacheBlend fragment reuse for SGLang, as a plugin.

Importing this package imports neither sglang nor torch; the SGLang side lives in
:mod:`sgl_kvext.sglang_plugin`, which SGLang loads through its plugin entry point.
"""

from sgl_kvext.config import BlendConfig, ConfigError, FragmentConfig, KVExtConfig, TierConfig
from sgl_kvext.fragments.prewarm_client import PrewarmFailed, PrewarmResult, prewarm_corpus

__all__ = ["BlendConfig", "ConfigError", "FragmentConfig", "KVExtConfig", "PrewarmFailed",
           "PrewarmResult", "TierConfig", "prewarm_corpus"]
__version__ = "0.1.0"
