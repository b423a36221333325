"""sgl-kvext's tree cache, registered with SGLang as radix-cache backend ``kvext``.

:class:`HierarchicalRadixCache` extends SGLang's ``RadixCache`` (the Python radix tree that
SGLang's other registered backend, FlexKV, also extends): match / insert / evict are short
Python methods a subclass can extend, where ``UnifiedRadixCache`` keeps them in a Rust core
entangled with SGLang's own HiCache state. Everything ``RadixCache`` does stays as it is;
tier residency lives beside the tree (in :class:`KVTiering` and the tiers), not on nodes.

- **Evict = demote.** Each evicted leaf's full tier pages (including the page it shares with
  its parent) are copied out of the device pool into the tier chain before its slots are
  reused. With ``write_through`` a finished request's pages are stored at once as well.
- **Match = promote.** After the device match, one question to the tiering
  (:meth:`KVTiering.admit`) decides: a run of pages the host tier holds is reported as
  ``host_hit_length`` and :meth:`init_load_back` allocates slots, copies the pages in and
  hangs a new node under the matched one; a request whose pages are still coming up from disk
  / S3 is held (reported as a one-page hit, answered None: SGLang keeps it queued) while
  waiting pays; otherwise nothing. A page that vanished or fails its checksum makes the load
  return 0: SGLang recomputes. The response says where the cached tokens came from
  (:mod:`.load_report`).
- **Fragment blend** (``--kvext-fragment-blend``). A request that may receive approximate KV
  lives in its own namespace (its extra key carries the blend mark, :mod:`.tenant`), so
  exact requests never match blended KV, on the device or in the tiers. When such a
  request's device match is followed by stored fragments, the span to the prompt's last token
  is reported as a host hit and :meth:`init_load_back` fills it through the
  :class:`BlendLoader`. The request's response carries what the blend did.

A match's decision waits in ``_pending`` for the ``init_load_back`` that follows it
(:mod:`.pending_steps`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from sgl_kvext.config.settings import KVExtConfig
from sgl_kvext.fragments.blender import BlendPlan, NoBlend
from sgl_kvext.fragments.report import Outcome
from sgl_kvext.pages.agreement import RankAgreement
from sgl_kvext.pages.keys import Tenant
from sgl_kvext.pages.plans import MISS, Hold, LoadOutcome, LoadPlan
from sgl_kvext.pages.tiering import KVTiering
from sgl_kvext.sglang_plugin.blend_jobs import BlendJobs, Ready
from sgl_kvext.sglang_plugin.blend_loader import BlendLoader, report_on
from sgl_kvext.sglang_plugin.heap_trim import HeapTrimmer
from sgl_kvext.sglang_plugin.load_report import report_load
from sgl_kvext.sglang_plugin.pending_steps import BlendStep, HoldStep, LoadStep, Victim
from sgl_kvext.sglang_plugin.scheduler_gaps import GAPS
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
from sgl_kvext.sglang_plugin.tenant import tenant_of
from sgl_kvext.sglang_plugin.tier_events import TierEventLog

logger = logging.getLogger("sgl_kvext")


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
    blend
        The blend path (``--kvext-fragment-blend``), or None.
    agreement
        How the tensor-parallel ranks agree on each admission and load (one rank: none).
    """

    def __init__(self, params: CacheInitParams, config: KVExtConfig,
                 tiering: KVTiering | None = None,
                 closers: Sequence[Callable[[], None]] = (),
                 blend: BlendLoader | None = None,
                 agreement: RankAgreement | None = None) -> None:
        self.kvext_config = config
        self.tiering = tiering
        self.blend = blend
        self.agreement = agreement or RankAgreement(None, 1)
        self._closers = list(closers)
        self._pending: dict[Any, HoldStep | LoadStep | BlendStep] = {}
        #: Blends running for waiting requests (the scheduler's idle hook waits on them).
        self.blend_jobs = BlendJobs(self.inc_lock_ref, self.dec_lock_ref)
        self._victims: list[Victim] | None = None
        self._heap = HeapTrimmer()
        super().__init__(params)
        self._tier_events = None          # tier residency in SGLang's KV events, if published
        if tiering is not None and self.kv_events.enabled:
            self._tier_events = TierEventLog([t.name for t in tiering.chain.tiers],
                                             tiering.tokens)
            tiering.chain.on_event(self._tier_events.add)

    @property
    def blender(self) -> Any:
        """The fragment blender (the /kvext routes use it), or None."""
        return self.blend.blender if self.blend is not None else None

    def note_chunk_spans(self, rid: Any, spans: Sequence[tuple[int, int]]) -> None:
        """Remember a request's marked chunks (prompt token spans) until it finishes."""
        if self.blend is not None:
            self.blend.note_chunk_spans(rid, spans)

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
        with GAPS.timed("evict_spill"):
            for victim in victims:          # slots are freed but not yet reused
                self._spill(victim)
        return result

    def _delete_leaf(self, node: TreeNode) -> None:
        if self._victims is not None and node.value is not None and len(node.value):
            tokens, slots = self._path(node)
            self._victims.append(Victim(tenant_of(node.key), tokens, slots,
                                         len(tokens) - len(node.key), node.parent))
        super()._delete_leaf(node)

    def _path(self, node: TreeNode) -> tuple[list[int], torch.Tensor]:
        parts = []
        cur = node
        while cur is not self.root_node:
            parts.append(cur.key.raw_token_ids())
            cur = cur.parent
        tokens = [t for part in reversed(parts) for t in part]
        return tokens, self.path_device_indices(node)

    def _ancestry(self, node: TreeNode | None, length: int) -> Iterator[tuple[int, int]]:
        """``(node id, path length)`` from ``node`` (its path ``length`` tokens long) up to
        the root's child: the prefixes :meth:`KVTiering.admit` remembers page keys for."""
        while node is not None and node is not self.root_node and length > 0:
            yield node.id, length
            length -= len(node.key)
            node = node.parent

    def _spill(self, victim: Victim) -> None:
        assert self.tiering is not None
        try:
            self.tiering.spill(victim.tenant, victim.tokens, victim.slots, victim.start,
                               self._ancestry(victim.parent, victim.start))
        except Exception:   # a tier failure must never fail the request that evicted
            logger.exception("sgl-kvext: spilling %d tokens failed; they will be recomputed",
                             len(victim.tokens) - victim.start)

    def checkpoint(self, req: Any, *, up_to: int) -> None:
        if self.tiering is not None and not req.finished():   # a prefill (chunk) just ran
            started = getattr(req.time_stats, "last_forward_entry_time", 0.0)
            if started > 0:
                self.tiering.observe_prefill(up_to - req.prefix_len,
                                             time.perf_counter() - started)
        super().checkpoint(req, up_to=up_to)
        if (self.tiering is not None and not self.disable and req.finished()
                and self.kvext_config.tiers.write_policy == "write_through"):
            with GAPS.timed("write_through"):
                tokens, slots = self._path(req.last_node)
                self._spill(Victim(tenant_of(req.last_node.key), tokens, slots, 0, None))

    # ----------------------------------------------------------------- match
    def supports_fast_match_prefix(self) -> bool:
        # SGLang then matches every waiting request on every pass: prefetch starts early.
        return self.tiering is not None

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        base = super().match_prefix(params)
        req = params.req
        if self.tiering is None or self.disable or req is None or len(params.key) == 0:
            return base
        handle = req.cache_request_handle
        self._pending.pop(handle, None)
        key = params.key.page_aligned(self.page_size)
        tokens, tenant, node = key.raw_token_ids(), tenant_of(key), base.last_device_node
        device_len = base.device_prefix_len
        report_load(req, device_len)          # a load that succeeds reports its tiers
        started = self.blend_jobs.started(handle, node)
        if started is not None and started.start == device_len:   # nothing to plan again
            return self._blend_step(req, handle, node, key, tenant, tokens, started, base)
        failed = False
        try:
            with GAPS.timed("admit"):
                step = self.tiering.admit(tenant, tokens, device_len, handle, self.page_size,
                                          self._ancestry(node, device_len))
        except Exception:
            logger.exception("sgl-kvext: tier lookup failed; serving the device match only")
            step, failed = MISS, True
        step = self.agreement.admission(step)     # every rank gets here, failed or not
        if failed:
            return base
        # A blend reaching past the pages the tiers hold (or are bringing up) wins: a loaded
        # page run ends the match, and the prompt's documents after it would run unblended.
        blend = None
        if tenant.blend and self.blend is not None and not self.blend_jobs.settled(handle):
            with GAPS.timed("blend_plan"):
                blend = self.blend.plan(req, tenant, tokens, device_len, self.page_size)
        past = blend is not None and blend.end > (step.end if isinstance(step, LoadPlan)
                                                  else device_len)
        if blend is not None and not past:
            report_on(req, blend.report.but(outcome=Outcome.PAGES))
        if not past:
            self.blend_jobs.drop(handle)              # a blend planned on an earlier pass is moot
        if isinstance(step, Hold) and not past:
            self._pending[handle] = HoldStep()
            return base._replace(host_hit_length=step.tokens)
        if isinstance(step, LoadPlan) and not past:
            self._pending[handle] = LoadStep(node, key[step.start:step.end], step)
            return base._replace(host_hit_length=step.tokens)
        if blend is None:
            return base
        if self._hold_for_fragments(handle, blend):   # a marked document is below host memory
            self.blend_jobs.drop(handle)
            self._pending[handle] = HoldStep()
            return base._replace(host_hit_length=blend.tokens)
        return self._blend_step(req, handle, node, key, tenant, tokens, blend, base)

    def _blend_step(self, req: Any, handle: Any, node: TreeNode, key: RadixKey, tenant: Tenant,
                    tokens: list[int], blend: BlendPlan, base: MatchResult) -> MatchResult:
        """The blend runs on the blend worker; the request waits in the queue meanwhile."""
        assert self.blend is not None
        loader = self.blend
        state = self.blend_jobs.poll(handle, node, blend, lambda: loader.submit(
            tenant, blend, tokens, self.path_device_indices(node)))
        if not isinstance(state, Ready):
            self._pending[handle] = HoldStep()
        elif isinstance(state.output, NoBlend):       # fetched nothing: computed as usual
            self.blend_jobs.take(handle)
            report_on(req, state.output.report)
            return base
        else:
            self._pending[handle] = BlendStep(node, key[blend.start:blend.end], blend)
        return base._replace(host_hit_length=blend.tokens)

    def _hold_for_fragments(self, handle: Any, blend: BlendPlan) -> bool:
        assert self.blend is not None and self.tiering is not None
        try:
            return self.blend.hold(handle, blend, self.tiering.cost,
                                   self.tiering.bytes_per_token)
        except Exception:
            logger.exception("sgl-kvext: fragment promotion failed; blending what is held")
            return False

    def init_load_back(self, params: InitLoadBackParams) -> tuple[int, Any] | None:
        node, req = params.best_match_node, params.req
        pending = self._pending.pop(req.cache_request_handle, None) if req is not None else None
        if isinstance(pending, HoldStep):
            return None              # SGLang keeps the request queued and matches it again
        if pending is None or self.tiering is None or pending.node is not node \
                or pending.key.child_key(self.page_size) in node.children \
                or pending.plan.tokens != params.host_hit_length:     # the tree changed
            if isinstance(pending, BlendStep):
                self.blend_jobs.drop(req.cache_request_handle)
                report_on(req, pending.plan.report.but(outcome=Outcome.DECLINED))
            return 0, node
        if isinstance(pending, BlendStep):
            assert self.blend is not None
            out = self.blend_jobs.take(req.cache_request_handle)   # its node unlocked
            if out is None:
                return 0, node
            with GAPS.timed("blend"):
                slots = self.blend.write(req, out, lambda n: self._alloc(node, n),
                                         self.token_to_kv_pool_allocator.free)
            return (0, node) if slots is None else (pending.plan.tokens,
                                                    self._attach(node, pending.key, slots))
        n = pending.plan.tokens
        slots = self._alloc(node, n)
        if slots is None:
            return 0, node
        try:
            with GAPS.timed("load"):
                loaded = self.tiering.load(pending.plan, slots, req.cache_request_handle)
        except Exception:
            logger.exception("sgl-kvext: loading %d tokens failed; recomputing them", n)
            loaded = LoadOutcome.MISSING
        loaded = self.agreement.outcome(loaded)
        if loaded is not LoadOutcome.LOADED:
            self.token_to_kv_pool_allocator.free(slots)
            # MOVED: SGLang keeps the request queued and matches it again (a new plan)
            return None if loaded is LoadOutcome.MOVED else (0, node)
        new_node = self._attach(node, pending.key, slots)
        report_load(req, pending.plan.start, self.tiering.tokens_by_tier(pending.plan))
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

    def device_prefix_len(self, key: RadixKey) -> int:
        """Tokens of ``key`` the device tree holds, read only: no access times, no node splits
        (a lookup must not change what is evicted next)."""
        node, matched = self.root_node, 0
        key = key.page_aligned(self.page_size)
        while len(key):
            child = node.children.get(key.child_key(self.page_size))
            if child is None:
                break
            n = child.key.match(key, page_size=self.page_size)
            matched += n
            if n < len(child.key):
                break
            node, key = child, key[n:]
        return matched

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

    def take_events(self) -> list[Any]:
        events: list[Any] = super().take_events()
        return events + self._tier_events.take() if self._tier_events is not None else events

    # ------------------------------------------------------------- lifecycle
    def reset(self) -> None:
        super().reset()
        if hasattr(self, "_pending"):   # reset() also runs inside RadixCache.__init__
            self._pending.clear()
            self.blend_jobs.clear()

    def on_release(self, req: Any, *, checkpointed: bool) -> None:
        self._forget(req.cache_request_handle, req.rid if req.finished() else None)
        self._heap.maybe_trim()        # between forward passes: RSS stays flat (heap_trim.py)

    def release_aborted_request(self, handle: Any) -> None:
        """SGLang dropped a waiting request (aborted, timed out): on_release never runs."""
        super().release_aborted_request(handle)
        self._forget(handle, getattr(handle, "rid", None))

    def _forget(self, handle: Any, rid: Any) -> None:
        """The request left: its pending step, blend job, holds and prefetch go."""
        self._pending.pop(handle, None)
        self.blend_jobs.forget(handle)
        if self.blend is not None:
            self.blend.forget(handle, rid)
        if self.tiering is not None:
            self.tiering.forget(handle)

    def release_host_resources(self) -> None:
        for close in self._closers:
            close()
        self._closers.clear()
        if self.blend is not None:
            self.blend.close()
            self.blend.blender.close()
            self.blend = None
        if self.tiering is not None:
            self.tiering.close()
            self.tiering = None

