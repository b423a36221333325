"""The ``kvext`` radix-cache backend: checks the model and pool, builds tiers and the tree.

SGLang's scheduler calls :func:`build_tree_cache` (``--radix-cache-backend kvext``, which
``--enable-hierarchical-kv`` selects). Unsupported set-ups fail here with one clear line.
"""

from __future__ import annotations

import dataclasses
import logging

from sgl_kvext.blend import BlendSettings
from sgl_kvext.config.settings import KVExtConfig, TierConfig
from sgl_kvext.config.values import format_size
from sgl_kvext.fragments.blender import FragmentBlender
from sgl_kvext.fragments.index import FragmentIndex
from sgl_kvext.fragments.store import FragmentStore, KVLayout
from sgl_kvext.pages.agreement import RankAgreement
from sgl_kvext.pages.keys import ModelIdentity
from sgl_kvext.pages.kv_pages import PagedKV
from sgl_kvext.pages.tiering import KVTiering
from sgl_kvext.scheduler_turn import pause
from sgl_kvext.sglang_plugin.blend_loader import BlendLoader
from sgl_kvext.sglang_plugin.identity import model_identity
from sgl_kvext.sglang_plugin.model_ops import LlamaLayerOps
from sgl_kvext.sglang_plugin.process_config import scheduler_config
from sgl_kvext.sglang_plugin.surface import (
    TreeCacheBuildContext,
    register_radix_cache_backend,
    registered_radix_cache_backends,
)
from sgl_kvext.sglang_plugin.tree import HierarchicalRadixCache
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.factory import build_chain
from sgl_kvext_kernels import RopeConfig

logger = logging.getLogger("sgl_kvext")


def _check_supported(ctx: TreeCacheBuildContext, config: KVExtConfig) -> None:
    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm or ctx.is_dsa:
        raise ValueError("--enable-hierarchical-kv supports full-attention models only; this "
                         "model has sliding-window, state-space or sparse-attention layers")
    if ctx.params.is_eagle:
        raise ValueError("--enable-hierarchical-kv does not support EAGLE speculative decoding")
    if config.tiers.page_tokens % ctx.params.page_size:
        raise ValueError(f"--kvext-page-tokens ({config.tiers.page_tokens}) must be a multiple "
                         f"of --page-size ({ctx.params.page_size})")


def sized_tiers(tiers: TierConfig, paged: PagedKV) -> TierConfig:
    """``tiers`` with the host tier sized by ``host_ratio`` (a multiple of the device pool's
    bytes: an H200's pool is tens of GiB, far above a fixed default), when set."""
    if tiers.host_ratio <= 0:
        return tiers
    pool_bytes = paged.page_nbytes // paged.tokens * int(paged.k[0].shape[0])
    return dataclasses.replace(tiers, host_size=int(tiers.host_ratio * pool_bytes))


def _paged_kv(ctx: TreeCacheBuildContext, page_tokens: int) -> PagedKV:
    pool = ctx.params.token_to_kv_pool_allocator.get_kvcache()
    k, v = getattr(pool, "k_buffer", None), getattr(pool, "v_buffer", None)
    if not isinstance(k, list) or not isinstance(v, list) or getattr(pool, "use_hnd", False):
        raise ValueError(f"--enable-hierarchical-kv needs an MHA KV pool in token-major layout; "
                         f"got {type(pool).__name__}")
    if getattr(pool, "store_dtype", None) != getattr(pool, "dtype", None):
        raise ValueError("--enable-hierarchical-kv does not support quantized KV caches "
                         "(--kv-cache-dtype fp8...)")
    return PagedKV(k, v, page_tokens)


def build_tree_cache(ctx: TreeCacheBuildContext) -> HierarchicalRadixCache:
    """Radix-cache factory SGLang's scheduler calls."""
    config = scheduler_config()
    _check_supported(ctx, config)
    if ctx.params.disable:
        return HierarchicalRadixCache(ctx.params, config)
    paged = _paged_kv(ctx, config.tiers.page_tokens)
    tiers = sized_tiers(config.tiers, paged)
    identity = model_identity(ctx.model_config, str(paged.dtype).removeprefix("torch."),
                              tiers.page_tokens, paged.layers, paged.kv_heads, paged.head_dim,
                              ctx.tp_rank, ctx.tp_size,
                              getattr(ctx.server_args, "quantization", None),
                              ctx.params.pp_rank, ctx.params.pp_size)
    chain = build_chain(tiers, identity.digest(), page_bytes=paged.page_nbytes)
    tiering = KVTiering(paged, chain, identity, prefetch_policy=tiers.prefetch_policy)
    logger.info("sgl-kvext: HierarchicalRadixCache active (tp %d/%d): pages of %d tokens "
                "(%s each); tiers %s; write policy %s", ctx.tp_rank, ctx.tp_size,
                tiers.page_tokens, format_size(paged.page_nbytes),
                " -> ".join(_describe(t.name, tiers) for t in chain.tiers), tiers.write_policy)
    blender = _fragment_blender(ctx, config, chain, identity) if config.fragments.enabled \
        else None
    closers = []
    if ctx.params.enable_metrics:
        from sgl_kvext.sglang_plugin.metrics_export import MetricsExporter

        closers.append(MetricsExporter(tiering, ctx.tp_rank, blender,
                                       interval_s=config.metrics_interval_s).close)
    blend = BlendLoader(blender, paged) if blender is not None else None
    group = ctx.params.tp_cache_group if ctx.tp_size > 1 else None
    return HierarchicalRadixCache(ctx.params, config, tiering, closers, blend,
                                  RankAgreement(group, tiers.page_tokens))


def check_blend_layer(check_layer: int, num_layers: int) -> None:
    """Refuse at start a check layer the model does not have (every blend would fail)."""
    if check_layer >= num_layers:
        raise ValueError(f"--kvext-blend-check-layer {check_layer}: this model has "
                         f"{num_layers} layers; allowed 0-{num_layers - 1}")


def _fragment_blender(ctx: TreeCacheBuildContext, config: KVExtConfig, chain: TierChain,
                      identity: ModelIdentity) -> FragmentBlender:
    """The fragment index, store and blender over the scheduler's own model."""
    if ctx.tp_size > 1:
        raise ValueError("--kvext-fragment-blend supports tensor parallelism 1 only "
                         f"(got --tp {ctx.tp_size})")
    ops = LlamaLayerOps(ctx.tp_worker.model_runner.model, pause)
    check_blend_layer(config.blend.check_layer, ops.num_layers)
    rope = RopeConfig.from_hf_config(ctx.model_config.hf_config)
    layout = KVLayout(ops.num_layers, ops.kv_heads, ops.head_dim, ops.dtype)
    frag = config.fragments
    index = FragmentIndex(frag.min_tokens, frag.chunking)
    chain.on_loss(index.discard)        # a fragment dropped by the tiers is registered anew
    store = FragmentStore(chain, identity, layout, ops.device)
    blender = FragmentBlender(ops, rope, store, index,
                              BlendSettings(config.blend.recompute_ratio,
                                            config.blend.check_layer,
                                            query_share=config.blend.query_share,
                                            spread=config.blend.spread),
                              prewarm_pending=frag.prewarm_queue,
                              max_text_tokens=int(ctx.model_config.context_len),
                              fallback_entropy=config.blend.fallback_entropy)
    logger.info("sgl-kvext: fragment blend on: chunking %s, fragments >= %d tokens, recompute "
                "ratio %.2f at layer %d, %.2f of it for the question, spread %s, exact above "
                "a first-token entropy of %g nats", frag.chunking, frag.min_tokens,
                config.blend.recompute_ratio, config.blend.check_layer,
                config.blend.query_share, config.blend.spread, config.blend.fallback_entropy)
    return blender


def _describe(name: str, tiers: TierConfig) -> str:
    if name == "host":
        return f"host {format_size(tiers.host_size)} ({tiers.eviction_policy})"
    if name == "disk":
        return f"disk {tiers.disk_dir} cap {format_size(tiers.disk_size)} ({tiers.codec})"
    return f"s3 {tiers.s3_url} at {tiers.s3_endpoint or 'AWS'} ({tiers.codec})"


def register_backend(name: str) -> None:
    """Register :func:`build_tree_cache` under ``name`` (once per process)."""
    if name not in registered_radix_cache_backends():
        register_radix_cache_backend(name, build_tree_cache)
