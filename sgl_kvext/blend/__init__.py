"""CacheBlend: a prefill that reuses chunk KV at any position (torch path on CPU)."""

from sgl_kvext.blend.model_ops import LlamaLayerOps
from sgl_kvext.blend.prefill import (
    ChunkKV,
    PrefillResult,
    PrefixKV,
    ReusedChunk,
    blended_prefill,
    compute_chunk_kv,
    full_prefill,
)

__all__ = ["ChunkKV", "LlamaLayerOps", "PrefillResult", "PrefixKV", "ReusedChunk",
           "blended_prefill", "compute_chunk_kv", "full_prefill"]
