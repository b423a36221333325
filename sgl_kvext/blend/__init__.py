"""CacheBlend: a prefill that reuses chunk KV at any position (torch path on CPU)."""

from sgl_kvext.blend.close_call import check_threshold, first_token_entropy
from sgl_kvext.blend.layer_ops import QKV, LayerOps
from sgl_kvext.blend.prefill import (
    ChunkKV,
    PrefillResult,
    PrefixKV,
    ReusedChunk,
    blended_prefill,
    compute_chunk_kv,
    full_prefill,
)
from sgl_kvext.blend.selection import DEFAULT_SETTINGS, BlendSettings

__all__ = ["DEFAULT_SETTINGS", "BlendSettings", "ChunkKV", "LayerOps", "PrefillResult",
           "PrefixKV", "QKV", "ReusedChunk", "blended_prefill", "check_threshold",
           "compute_chunk_kv", "first_token_entropy", "full_prefill"]
