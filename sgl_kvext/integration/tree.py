"""sgl-kvext's tree cache, registered with SGLang as radix-cache backend ``kvext``.

:class:`HierarchicalRadixCache` extends SGLang's ``RadixCache`` (the Python radix tree that
SGLang's other registered backend, FlexKV, also extends): its match / insert / evict paths
are short Python methods a subclass can extend, where ``UnifiedRadixCache`` keeps them in a
Rust core entangled with SGLang's own HiCache state. In this version the subclass adds no
behaviour of its own: it carries the validated :class:`KVExtConfig` and reports itself, so
serving with ``--enable-hierarchical-kv`` is exactly SGLang's radix-cache serving.
"""

from __future__ import annotations

import dataclasses
import logging

from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang.srt.mem_cache.registry import (
    TreeCacheBuildContext,
    register_radix_cache_backend,
    registered_radix_cache_backends,
)

from sgl_kvext import env
from sgl_kvext.config import KVExtConfig

logger = logging.getLogger("sgl_kvext")


class HierarchicalRadixCache(RadixCache):
    """SGLang's radix tree, owned by sgl-kvext.

    Parameters
    ----------
    params
        SGLang's cache construction parameters (pools, page size, eviction policy, events).
    config
        The validated sgl-kvext configuration.
    """

    def __init__(self, params: CacheInitParams, config: KVExtConfig) -> None:
        super().__init__(params)
        self.kvext_config = config


def process_config() -> KVExtConfig | None:
    """The launcher's resolved config in a process SGLang spawned, else None (launcher)."""
    resolved = env.get(env.RESOLVED_CONFIG)
    return KVExtConfig.from_json(resolved) if resolved else None


def scheduler_config() -> KVExtConfig:
    """The config the launcher resolved (inherited JSON), else one read from YAML / variables.

    The backend was selected explicitly when this runs, so the result is always enabled.
    """
    resolved = env.get(env.RESOLVED_CONFIG)
    config = KVExtConfig.from_json(resolved) if resolved else KVExtConfig.load()
    return config if config.enabled else dataclasses.replace(config, enabled=True)


def build_tree_cache(ctx: TreeCacheBuildContext) -> HierarchicalRadixCache:
    """Radix-cache factory SGLang's scheduler calls (``--radix-cache-backend kvext``)."""
    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm or ctx.is_dsa:
        raise ValueError("--enable-hierarchical-kv supports full-attention models only; this "
                         "model has sliding-window, state-space or sparse-attention layers")
    config = scheduler_config()
    cache = HierarchicalRadixCache(ctx.params, config)
    tiers = config.tiers
    logger.info("sgl-kvext: %s active (page_size=%d, tp %d/%d); configured tiers: host=%d B, "
                "disk=%s, s3=%s; spilling to tiers is not wired into the tree in this version",
                type(cache).__name__, ctx.params.page_size, ctx.tp_rank, ctx.tp_size,
                tiers.host_size, tiers.disk_dir or "off", tiers.s3_url or "off")
    return cache


def register_backend(name: str) -> None:
    """Register :func:`build_tree_cache` under ``name`` (once per process)."""
    if name not in registered_radix_cache_backends():
        register_radix_cache_backend(name, build_tree_cache)
