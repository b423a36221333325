"""The tree's own cost: sgl-kvext's HierarchicalRadixCache against SGLang's RadixCache,
replaying one recorded operation trace in-process (no model, no server).

The trace is a seeded multi-tenant chat workload: each request is matched
(``match_prefix``; for ours also the tier admission and, on a hit, ``init_load_back``), its
uncached tokens get slots, and it is inserted when it finishes; when the pool runs short the
tree evicts. Both trees run the same trace on SGLang's real CPU KV pool and allocator in
interleaved rounds (radix, ours, radix, ours, ...: a slow stretch of a noisy machine hits
both), after one untimed warm-up round; each figure is the median over the rounds, each ratio
the median of the rounds' own ratios. ``ours`` has
a host tier large enough for the working set, so what it evicts comes back from the host tier
(page copies the plain tree cannot do, reported as their own count); ``ours_no_evict`` runs a
pool that never fills, so the ratio there is the tree's bookkeeping alone.
"""

from __future__ import annotations

import random
import statistics
import time
import types
from array import array
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from sgl_kvext.config.settings import KVExtConfig, TierConfig
from sgl_kvext.pages.keys import ModelIdentity
from sgl_kvext.pages.kv_pages import PagedKV
from sgl_kvext.pages.tiering import KVTiering
from sgl_kvext.sglang_plugin.surface import find
from sgl_kvext.sglang_plugin.tree import HierarchicalRadixCache
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.host import HostTier

LAYERS, HEADS, DIM, PAGE = 2, 1, 8, 32


class Op(NamedTuple):
    """One request: its tenant (cache salt) and prompt tokens."""

    salt: str
    tokens: tuple[int, ...]


def chat_trace(requests: int, users: int = 64, tenants: int = 4, system_tokens: int = 256,
               turn_tokens: int = 96, max_tokens: int = 2048, seed: int = 0) -> list[Op]:
    """``requests`` prompts of ``users`` chats: a system prompt per tenant, then each user's
    history growing by ``turn_tokens`` per turn (restarting past ``max_tokens``)."""
    rng = random.Random(seed)
    system = [[rng.randrange(1, 50_000) for _ in range(system_tokens)] for _ in range(tenants)]
    history: list[list[int]] = [[] for _ in range(users)]
    ops = []
    for _ in range(requests):
        u = rng.randrange(users)
        if len(history[u]) + turn_tokens + system_tokens > max_tokens:
            history[u] = []
        history[u] += [rng.randrange(1, 50_000) for _ in range(turn_tokens)]
        ops.append(Op(f"t{u % tenants}", tuple(system[u % tenants] + history[u])))
    return ops


class Counts(NamedTuple):
    seconds: float
    cached_tokens: int
    loaded_tokens: int


def _replay(tree: Any, alloc: Any, ops: Sequence[Op]) -> Counts:
    radix_key = find("sglang.srt.mem_cache.radix_cache:RadixKey")
    match_params = find("sglang.srt.mem_cache.base_prefix_cache:MatchPrefixParams")
    insert_params = find("sglang.srt.mem_cache.base_prefix_cache:InsertParams")
    load_params = find("sglang.srt.mem_cache.base_prefix_cache:InitLoadBackParams")
    evict_params = find("sglang.srt.mem_cache.base_prefix_cache:EvictParams")
    cached = loaded = 0
    start = time.perf_counter()
    for n, op in enumerate(ops):
        key = radix_key(array("q", op.tokens), cache_salt=op.salt)
        req = types.SimpleNamespace(cache_request_handle=n, rid=n)
        m = tree.match_prefix(match_params(key=key, req=req))
        node, have = m.last_device_node, m.device_prefix_len
        if m.host_hit_length:
            out = tree.init_load_back(load_params(best_match_node=m.best_match_node,
                                                  host_hit_length=m.host_hit_length, req=req))
            if out is not None and out[0]:
                node, have = out[1], have + out[0]
                loaded += out[0]
        cached += have
        need = len(op.tokens) - have
        tree.inc_lock_ref(node)                  # as SGLang holds a running request's prefix
        if alloc.available_size() < need:
            tree.evict(evict_params(num_tokens=need - alloc.available_size()))
        fresh = alloc.alloc(need)
        if fresh is not None:
            prefix = tree.path_device_indices(node).to(torch.int64)
            slots = torch.cat((prefix, fresh))
            result = tree.insert(insert_params(key=key, value=slots))
            alloc.free(slots[len(prefix):result.prefix_len])   # duplicates the tree kept
        tree.dec_lock_ref(node)
    return Counts(time.perf_counter() - start, cached, loaded)


def _build(kind: str, pool_tokens: int, host_bytes: int) -> tuple[Any, Any, Callable[[], None]]:
    pool_cls = find("sglang.srt.mem_cache.memory_pool:MHATokenToKVPool")
    alloc_cls = find("sglang.srt.mem_cache.allocator.token:TokenToKVPoolAllocator")
    params_cls = find("sglang.srt.mem_cache.cache_init_params:CacheInitParams")
    pool = pool_cls(pool_tokens, 1, torch.float32, HEADS, DIM, LAYERS, "cpu", False)
    alloc = alloc_cls(pool_tokens, torch.float32, "cpu", pool, False)
    params = params_cls(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=alloc,
                        page_size=1)
    if kind == "radix":
        return find("sglang.srt.mem_cache.radix_cache:RadixCache")(params), alloc, lambda: None
    paged = PagedKV(pool.k_buffer, pool.v_buffer, PAGE)
    host = HostTier(host_bytes, block_bytes=paged.page_nbytes)
    if not host.wait_populated(120):      # its pre-fault thread must not run while timed
        raise RuntimeError("the host tier's memory took over 120 s to fault in")
    tiering = KVTiering(paged, TierChain([host]),
                        ModelIdentity("cfg", "w", "float32", PAGE, "bench"), prefetch_threads=1,
                        prefetch_policy="best_effort")
    config = KVExtConfig(enabled=True, tiers=TierConfig(write_policy="write_back"))
    tree = HierarchicalRadixCache(params, config, tiering)
    return tree, alloc, tiering.close


def run_tree_overhead(requests: int = 10_000, pool_tokens: int = 65_536,
                      progress: Callable[[str], None] = print,
                      rounds: int = 5) -> dict[str, Any]:
    """Both trees on one trace (see the module doc)."""
    ops = chat_trace(requests)
    total = sum(len(op.tokens) for op in ops)
    unbounded = total + 1024
    results: dict[str, Any] = {"requests": requests, "prompt_tokens": total,
                               "pool_tokens": pool_tokens, "rounds": rounds, "runs": {}}
    pairs = {"": pool_tokens, "_no_evict": unbounded}
    timed: dict[str, list[Counts]] = {f"{k}{s}": [] for s in pairs for k in ("radix", "ours")}
    for round_ in range(rounds + 1):                  # round 0 warms up, untimed
        for suffix, pool in pairs.items():
            for kind in ("radix", "ours"):
                tree, alloc, close = _build(kind, pool, 1 << 30)
                counts = _replay(tree, alloc, ops)
                close()
                if round_:
                    timed[kind + suffix].append(counts)
        progress(f"tree overhead: round {round_}/{rounds} " + ", ".join(
            f"{name} {runs[-1].seconds:.2f}s" for name, runs in timed.items() if runs))
    for name, runs in timed.items():
        results["runs"][name] = {"seconds": statistics.median(c.seconds for c in runs),
                                 "seconds_all": [c.seconds for c in runs],
                                 "cached_tokens": runs[-1].cached_tokens,
                                 "loaded_tokens": runs[-1].loaded_tokens}
    for suffix in pairs:
        ratios = [o.seconds / r.seconds
                  for o, r in zip(timed["ours" + suffix], timed["radix" + suffix], strict=True)]
        results["ratio" + suffix] = statistics.median(ratios)
        results["ratios" + suffix] = ratios
    return results
