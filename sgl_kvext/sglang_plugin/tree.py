"""sgl-kvext's tree cache, registered with SGLang as radix-cache backend ``kvext``.

:class:`HierarchicalRadixCache` extends SGLang's ``RadixCache`` (the Python radix tree that
SGLang's other registered backend, FlexKV, also extends): match / insert / evict are short
Python methods a subclass can extend, where ``UnifiedRadixCache`` keeps them in a Rust core
entangled with SGLang's own HiCache state. Everything ``RadixCache`` does stays as it is;
tier residency lives beside the tree (in :class:`KVTiering` and the tiers), not on nodes.

- **Evict = demote.** Each evicted leaf's full tier pages (including the page it shares with
  its parent) are copied out of the device pool into the tier chain before its slots are
  reused. With ``write_through`` a finished request's pages are stored at once as well.
- **Match = promote.** After the device match, the run of pages the host tier holds is
  reported as ``host_hit_length``; SGLang then calls :meth:`init_load_back`, which allocates
  slots, copies the pages in and hangs a new node under the matched one. Pages on disk / S3
  are prefetched into the host tier in the background, so the scheduler never waits on them.
  A page that vanished or fails its checksum makes the load return 0: SGLang recomputes.
- **Fragment blend** (``--kvext-fragment-blend``). A request that may receive approximate KV
  lives in its own tree namespace (its extra key carries :data:`BLEND_NAMESPACE`, set when
  the request is created), so exact requests never match blended KV, on the device or in the
  tiers. When such a request's device match ends before stored fragments, the span up to the
  last of them is reported as a host hit and :meth:`init_load_back` fills it with the blended
  prefill (run on the scheduler thread: it replaces a longer prefill of the same span).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from sgl_kvext.blend import PrefixKV
from sgl_kvext.config import env
from sgl_kvext.config.settings import KVExtConfig
from sgl_kvext.fragments.blender import BlendPlan, FragmentBlender, NoBlend
from sgl_kvext.fragments.report import BlendReport, Outcome
from sgl_kvext.pages.tiering import KVTiering, LoadPlan
from sgl_kvext.sglang_plugin.heap_trim import HeapTrimmer
from sgl_kvext.sglang_plugin.surface import (
    CacheInitParams,
    EvictParams,
    EvictResult,
    InitLoadBackParams,
    MatchPrefixParams,
    MatchResult,
    RadixCache,
    RadixKey,
    TreeNode,
)

logger = logging.getLogger("sgl_kvext")
#: Longest a request is held for a prefetch (``wait_complete``, and the cap of ``timeout``).
WAIT_CAP_S = 30.0
#: Appended to the extra key of requests that may receive blended (approximate) KV.
BLEND_NAMESPACE = "\x00kvext-blend"
#: The response's ``meta_info`` key holding ``[BlendReport.as_dict()]`` (SGLang's
#: ``customized_info`` channel: a list with one entry, sent with the first output token).
REPORT_KEY = "kvext_blend"


def salt_of(key: RadixKey) -> str:
    """Tenant namespace of a key: SGLang's extra key and cache salt, unambiguously joined."""
    return f"{key.extra_key or ''}\x00{key.cache_salt or ''}"


@dataclasses.dataclass(frozen=True, slots=True)
class _Pending:
    """What a match promised, for the ``init_load_back`` that follows it."""

    plan: LoadPlan | None
    node: TreeNode
    key: RadixKey | None   # tokens [plan.start, plan.end), a copy (the request's ids change)
    hold: bool = False     # a prefetch is still running: retry admission instead of loading
    blend: BlendPlan | None = None   # fill [blend.start, blend.end) by a blended prefill
    tokens: tuple[int, ...] = ()     # the prompt, for the blend


class HierarchicalRadixCache(RadixCache):
    """SGLang's radix tree with evicted KV spilling down a tier chain and loading back.

    Parameters
    ----------
    params
        SGLang's cache construction parameters (pools, page size, eviction policy, events).
    config
        The validated sgl-kvext configuration.
    tiering
        Device-pool <-> tier-chain mover; None keeps the plain radix cache (e.g. disabled).
    closers
        Called (before the tiers close) when SGLang releases host resources at shutdown.
    """

    def __init__(self, params: CacheInitParams, config: KVExtConfig,
                 tiering: KVTiering | None = None,
                 closers: Sequence[Callable[[], None]] = (),
                 blender: FragmentBlender | None = None) -> None:
        self.kvext_config = config
        self.tiering = tiering
        self.blender = blender
        self._closers = list(closers)
        self._pending: dict[Any, _Pending] = {}
        self._deadlines: dict[Any, float] = {}
        self._victims: list[tuple[str, list[int], torch.Tensor, int]] | None = None
        self._heap = HeapTrimmer()
        super().__init__(params)

    # ----------------------------------------------------------------- evict
    def evict(self, params: EvictParams) -> EvictResult:
        if self.tiering is None:
            return super().evict(params)
        self._victims = []
        try:
            result = super().evict(params)
            victims = self._victims
        finally:
            self._victims = None
        for salt, tokens, slots, start in victims:   # slots are freed but not yet reused
            self._spill(salt, tokens, slots, start)
        return result

    def _delete_leaf(self, node: TreeNode) -> None:
        if self._victims is not None and node.value is not None and len(node.value):
            tokens, slots = self._path(node)
            self._victims.append((salt_of(node.key), tokens, slots,
                                  len(tokens) - len(node.key)))
        super()._delete_leaf(node)

    def _path(self, node: TreeNode) -> tuple[list[int], torch.Tensor]:
        parts = []
        cur = node
        while cur is not self.root_node:
            parts.append(cur.key.raw_token_ids())
            cur = cur.parent
        tokens = [t for part in reversed(parts) for t in part]
        return tokens, self.path_device_indices(node)

    def _spill(self, salt: str, tokens: list[int], slots: torch.Tensor, start: int) -> None:
        assert self.tiering is not None
        try:
            self.tiering.spill(salt, tokens, slots, start)
        except Exception:   # a tier failure must never fail the request that evicted
            logger.exception("sgl-kvext: spilling %d tokens failed; they will be recomputed",
                             len(tokens) - start)

    def checkpoint(self, req: Any, *, up_to: int) -> None:
        if self.tiering is not None and not req.finished():   # a prefill (chunk) just ran
            started = getattr(req.time_stats, "last_forward_entry_time", 0.0)
            if started > 0:
                self.tiering.cost.observe_prefill(up_to - req.prefix_len,
                                                  time.perf_counter() - started)
        super().checkpoint(req, up_to=up_to)
        if (self.tiering is not None and not self.disable and req.finished()
                and self.kvext_config.tiers.write_policy == "write_through"):
            tokens, slots = self._path(req.last_node)
            self._spill(salt_of(req.last_node.key), tokens, slots, 0)

    # ----------------------------------------------------------------- match
    def supports_fast_match_prefix(self) -> bool:
        # SGLang then matches every waiting request on every pass: prefetch starts early.
        return self.tiering is not None

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        base = super().match_prefix(params)
        req = params.req
        if self.tiering is None or self.disable or req is None or len(params.key) == 0:
            return base
        key = params.key.page_aligned(self.page_size)
        tokens = key.raw_token_ids()
        device_len = base.device_prefix_len
        try:
            plan = self.tiering.plan(salt_of(key), tokens, device_len,
                                     prefetch_id=req.cache_request_handle)
        except Exception:
            logger.exception("sgl-kvext: tier lookup failed; serving the device match only")
            plan = None
        handle = req.cache_request_handle
        if plan is not None and plan.tokens % self.page_size:
            plan = None
        if self._holding(handle, len(tokens), plan, device_len):
            hit = plan.tokens if plan is not None else self.page_size
            self._pending[handle] = _Pending(plan, base.last_device_node, None, hold=True)
            return base._replace(host_hit_length=hit)
        if plan is None:
            blend = self._plan_blend(req, key, tokens, device_len)
            if not isinstance(blend, BlendPlan):
                self._pending.pop(handle, None)
                return base
            self._pending[handle] = _Pending(None, base.last_device_node,
                                             key[blend.start:blend.end], blend=blend,
                                             tokens=tuple(tokens))
            return base._replace(host_hit_length=blend.tokens)
        self._pending[handle] = _Pending(plan, base.last_device_node, key[plan.start:plan.end])
        return base._replace(host_hit_length=plan.tokens)

    def _plan_blend(self, req: Any, key: RadixKey, tokens: list[int],
                    device_len: int) -> BlendPlan | NoBlend | None:
        """The request's blend (None outside the blend namespace); its report is attached
        to the request (the last match before admission is the one the response carries)."""
        if self.blender is None or not (key.extra_key or "").endswith(BLEND_NAMESPACE):
            return None
        try:
            blend = self.blender.plan(salt_of(key), tokens, device_len,
                                      getattr(req, "kvext_chunk_spans", ()), self.page_size)
        except Exception:
            logger.exception("sgl-kvext: fragment lookup failed; computing the prompt in full")
            blend = NoBlend(BlendReport(Outcome.FAILED, device_len, device_len))
        _report(req, blend.report)
        return blend

    def _holding(self, handle: Any, n_tokens: int, plan: LoadPlan | None,
                 device_len: int) -> bool:
        """Whether to keep the request waiting for its running prefetch (prefetch policy)."""
        assert self.tiering is not None
        policy = self.kvext_config.tiers.prefetch_policy
        if policy == "best_effort" or not self.tiering.prefetcher.pending(handle):
            self._deadlines.pop(handle, None)
            return False
        now = time.monotonic()
        deadline = self._deadlines.get(handle)
        if deadline is None:
            missing = n_tokens - (plan.end if plan is not None else device_len)
            budget = WAIT_CAP_S if policy == "wait_complete" else \
                self.tiering.cost.hold_budget_s(missing, self.tiering.bytes_per_token, WAIT_CAP_S)
            deadline = self._deadlines[handle] = now + budget
        return now < deadline

    def init_load_back(self, params: InitLoadBackParams) -> tuple[int, Any] | None:
        node = params.best_match_node
        req = params.req
        pending = self._pending.pop(req.cache_request_handle, None) if req is not None else None
        if pending is not None and pending.hold:
            return None              # SGLang keeps the request queued and matches it again
        if (pending is None or pending.key is None or self.tiering is None
                or pending.node is not node
                or pending.key.child_key(self.page_size) in node.children):   # tree grew
            if pending is not None and pending.blend is not None:
                _report(req, pending.blend.report.but(outcome=Outcome.DECLINED))
            return 0, node
        if pending.blend is not None and pending.blend.tokens == params.host_hit_length:
            return self._load_blend(req, node, pending)
        if pending.plan is None or pending.plan.tokens != params.host_hit_length:
            return 0, node
        n = pending.plan.tokens
        slots = self._alloc(node, n)
        if slots is None:
            return 0, node
        try:
            loaded = self.tiering.load(pending.plan, slots)
        except Exception:
            logger.exception("sgl-kvext: loading %d tokens failed; recomputing them", n)
            loaded = False
        if not loaded:
            self.token_to_kv_pool_allocator.free(slots)
            return 0, node
        new_node = self._attach(node, pending.key, slots)
        if getattr(self, "metrics_collector", None) is not None:
            self.metrics_collector.increment_load_back_num_tokens(n, pool="kv")
        return n, new_node

    def _alloc(self, node: TreeNode, n: int) -> torch.Tensor | None:
        """``n`` fresh slots, evicting others if needed (never ``node``'s path)."""
        allocator = self.token_to_kv_pool_allocator
        if allocator.available_size() < n:
            self.inc_lock_ref(node)
            try:
                self.evict(EvictParams(num_tokens=n - allocator.available_size()))
            finally:
                self.dec_lock_ref(node)
        slots: torch.Tensor | None = allocator.alloc(n)
        return slots

    def _load_blend(self, req: Any, node: TreeNode, pending: _Pending) -> tuple[int, Any]:
        assert self.tiering is not None and self.blender is not None
        assert pending.blend is not None and pending.key is not None
        plan, pool = pending.blend, self.tiering.pool
        slots = None
        try:
            prefix_slots = self.path_device_indices(node).to(torch.int64)
            if prefix_slots.numel() != plan.start:
                _report(req, plan.report.but(outcome=Outcome.DECLINED))
                return 0, node
            prefix = PrefixKV(torch.stack([b[prefix_slots] for b in pool.k]),
                              torch.stack([b[prefix_slots] for b in pool.v]))
            out = self.blender.run(salt_of(pending.key), plan, pending.tokens, prefix)
            _report(req, out.report)
            if isinstance(out, NoBlend):
                return 0, node
            logger.debug("sgl-kvext: blended %d tokens after %d (%d reused, %d recomputed)",
                         plan.tokens, plan.start, out.report.reused_tokens,
                         out.report.recomputed_tokens)
            slots = self._alloc(node, plan.tokens)
            if slots is None:
                _report(req, plan.report.but(outcome=Outcome.DECLINED))
                return 0, node
            for layer in range(pool.layers):
                pool.k[layer][slots] = out.k[layer].to(pool.dtype)
                pool.v[layer][slots] = out.v[layer].to(pool.dtype)
        except Exception:
            logger.exception("sgl-kvext: blending %d tokens failed; computing them", plan.tokens)
            _report(req, plan.report.but(outcome=Outcome.FAILED))
            if slots is not None:
                self.token_to_kv_pool_allocator.free(slots)
            return 0, node
        return plan.tokens, self._attach(node, pending.key, slots)

    def _attach(self, node: TreeNode, key: RadixKey, slots: torch.Tensor) -> TreeNode:
        """Hang a new node holding ``key``'s KV in ``slots`` under ``node``."""
        new_node = TreeNode(priority=node.priority)
        new_node.key, new_node.value, new_node.parent = key, slots.to(torch.int64), node
        node.children[key.child_key(self.page_size)] = new_node
        self.evictable_size_ += len(key)
        self._update_leaf_status(node)
        self._update_leaf_status(new_node)
        self.kv_events.record_store(new_node)
        return new_node

    # ------------------------------------------------------------- lifecycle
    def reset(self) -> None:
        super().reset()
        if hasattr(self, "_pending"):   # reset() also runs inside RadixCache.__init__
            self._pending.clear()
            self._deadlines.clear()

    def on_release(self, req: Any, *, checkpointed: bool) -> None:
        self._pending.pop(req.cache_request_handle, None)
        self._deadlines.pop(req.cache_request_handle, None)
        self._heap.maybe_trim()        # between forward passes: RSS stays flat (heap_trim.py)

    def release_host_resources(self) -> None:
        for close in self._closers:
            close()
        self._closers.clear()
        if self.blender is not None:
            self.blender.close()
            self.blender = None
        if self.tiering is not None:
            self.tiering.close()
            self.tiering = None


def _report(req: Any, report: BlendReport) -> None:
    """Put ``report`` in the request's response (``meta_info[REPORT_KEY]``)."""
    if req is not None:
        req.customized_info = {**(req.customized_info or {}), REPORT_KEY: [report.as_dict()]}


def process_config() -> KVExtConfig | None:
    """The launcher's resolved config in a process SGLang spawned, else None (launcher)."""
    resolved = env.get(env.RESOLVED_CONFIG)
    return KVExtConfig.from_json(resolved) if resolved else None


def scheduler_config() -> KVExtConfig:
    """The config the launcher resolved (inherited JSON), else one read from YAML / variables.

    The backend was selected explicitly when this runs, so the result is always enabled.
    """
    config = process_config() or KVExtConfig.load()
    return config if config.enabled else dataclasses.replace(config, enabled=True)
