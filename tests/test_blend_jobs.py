"""A blend-namespace request's blended prefill runs on the blend worker while the request waits
in the queue: the scheduler thread is never held by it (it used to run the whole blend inside
admission, 2.18 s between two forwards of every running request). The tree on SGLang's real
CPU KV pool and allocator, real host tier, a random-weight Llama; ``BlendJobs`` alone for the
lock contract."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
import types
from array import array
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import (
    EvictParams,
    InitLoadBackParams,
    InsertParams,
    MatchPrefixParams,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.radix_cache import RadixKey

from sgl_kvext.blend import PrefixKV
from sgl_kvext.config.settings import KVExtConfig
from sgl_kvext.fragments.blender import BlendOutput, BlendPlan, FragmentBlender
from sgl_kvext.fragments.index import FragmentIndex, locate_chunks
from sgl_kvext.fragments.report import BlendReport, Outcome
from sgl_kvext.fragments.store import FragmentStore, KVLayout
from sgl_kvext.pages.keys import ModelIdentity, Tenant
from sgl_kvext.pages.kv_pages import PagedKV
from sgl_kvext.pages.tiering import KVTiering
from sgl_kvext.sglang_plugin.blend_jobs import MAX_JOBS, BlendJobs, Ready, Running
from sgl_kvext.sglang_plugin.blend_loader import REPORT_KEY, BlendLoader
from sgl_kvext.sglang_plugin.tenant import with_blend_mark
from sgl_kvext.sglang_plugin.tree import HierarchicalRadixCache
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.host import HostTier
from sgl_kvext_bench.random_llama import RandomLlamaOps

HEAD, QUESTION = 6, 9


class Rig:
    """The tree with the blend path over a random Llama, three documents pre-warmed, and a
    gate that keeps the blend worker's blend from finishing (``slow_blend_fake``: a blend
    slower than any test should wait for, which a real part only produces by chance)."""

    def __init__(self) -> None:
        self.ops = RandomLlamaOps(layers=8)   # the default check layer is 6
        ops = self.ops
        self.pool = MHATokenToKVPool(1024, 1, torch.float32, ops.kv_heads, ops.head_dim,
                                     ops.num_layers, "cpu", False)
        self.alloc = TokenToKVPoolAllocator(1024, torch.float32, "cpu", self.pool, False)
        paged = PagedKV(self.pool.k_buffer, self.pool.v_buffer, 8)
        identity = ModelIdentity("cfg", "w", "float32", 8, "test")
        chain = TierChain([HostTier(256 * paged.page_nbytes, block_bytes=paged.page_nbytes)])
        self.tiering = KVTiering(paged, chain, identity)
        store = FragmentStore(chain, identity, KVLayout(ops.num_layers, ops.kv_heads,
                                                        ops.head_dim, ops.dtype))
        self.blender = FragmentBlender(ops, ops.rope, store, FragmentIndex(16, "explicit"))
        self.loader = BlendLoader(self.blender, paged)
        params = CacheInitParams(disable=False, req_to_token_pool=None,
                                 token_to_kv_pool_allocator=self.alloc, page_size=1)
        self.tree = HierarchicalRadixCache(params, KVExtConfig(enabled=True), self.tiering,
                                           blend=self.loader)
        self.total = self.alloc.available_size()
        self.tenant, rng = Tenant(blend=True), np.random.default_rng(0)
        self.docs = [rng.integers(0, 1000, 60) for _ in range(3)]
        keys, _ = self.blender.prewarm_async(self.tenant, self.docs)
        deadline = time.monotonic() + 60
        while not all(self.blender.index.known(k) for k in keys):
            assert time.monotonic() < deadline, "pre-warm did not finish"
            time.sleep(0.01)
        self.head = [int(t) for t in rng.integers(0, 1000, HEAD)]
        self.prompt = [*self.head, *(int(t) for d in self.docs for t in d),
                       *(int(t) for t in rng.integers(0, 1000, QUESTION))]
        self.gate = threading.Event()
        self.blend_threads: list[str] = []
        real_run = self.blender.run

        def slow_blend_fake(*args: Any, **kwargs: Any) -> Any:
            self.blend_threads.append(threading.current_thread().name)
            assert self.gate.wait(30.0), "the test never opened the gate"
            return real_run(*args, **kwargs)

        self.blender.run = slow_blend_fake  # type: ignore[method-assign]

    def key(self, tokens: list[int]) -> RadixKey:
        return RadixKey(array("q", tokens), with_blend_mark(None))

    def insert_head(self) -> None:
        slots = self.alloc.alloc(HEAD)
        assert slots is not None
        for layer in range(self.ops.num_layers):
            self.pool.k_buffer[layer][slots] = torch.randn(HEAD, self.ops.kv_heads,
                                                           self.ops.head_dim)
            self.pool.v_buffer[layer][slots] = torch.randn(HEAD, self.ops.kv_heads,
                                                           self.ops.head_dim)
        self.tree.insert(InsertParams(key=self.key(self.head), value=slots))

    def request(self, rid: str) -> Any:
        self.tree.note_chunk_spans(rid, locate_chunks(np.asarray(self.prompt), self.docs))
        return types.SimpleNamespace(cache_request_handle=rid, rid=rid,
                                     finished=lambda: False)

    def admit_when_blended(self, req: Any) -> tuple[Any, tuple[int, Any] | None]:
        """Scheduler passes over ``req`` until it is admitted, each held pass waiting for
        the running blend as SGLang's idle hook does."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m, out = self.admit(req)
            if out is not None:
                return m, out
            self.tree.blend_jobs.wait(0.02)
        raise AssertionError("the request was held for a minute")

    def admit(self, req: Any) -> tuple[Any, tuple[int, Any] | None]:
        """One scheduler pass over ``req``: match, then load back (None: held)."""
        m = self.tree.match_prefix(MatchPrefixParams(key=self.key(self.prompt), req=req))
        if m.host_hit_length == 0:
            return m, (0, m.last_device_node)
        return m, self.tree.init_load_back(InitLoadBackParams(
            best_match_node=m.best_match_node, host_hit_length=m.host_hit_length, req=req))

    def close(self) -> None:
        self.gate.set()
        self.tree.release_host_resources()
        self.tiering.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def test_a_blend_runs_on_the_worker_while_its_request_waits_then_fills_the_span(
        rig: Rig) -> None:
    rig.insert_head()
    req = rig.request("r")
    m, out = rig.admit(req)
    span = len(rig.prompt) - 1 - HEAD
    assert m.device_prefix_len == HEAD and m.host_hit_length == span
    assert out is None                             # held: the pass returned, the blend runs
    deadline = time.monotonic() + 30
    while not rig.blend_threads:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert rig.blend_threads == ["kvext-blend_0"]
    # The prefix the worker reads is locked: evicting everything leaves it on the device.
    assert rig.tree.protected_size() == HEAD
    rig.tree.evict(EvictParams(num_tokens=rig.total))
    assert rig.tree.device_prefix_len(rig.key(rig.prompt)) == HEAD
    prefix_slots = rig.tree.path_device_indices(m.last_device_node)[:HEAD]
    prefix = PrefixKV(*rig.loader.pool.read_tokens(prefix_slots))

    # Held passes do not plan the request again (the blend started from this device match).
    calls = []
    rig.loader.plan = lambda *a, **k: calls.append(a)  # type: ignore[method-assign]
    assert rig.admit(req)[1] is None and calls == []
    rig.gate.set()
    m, out = rig.admit_when_blended(req)
    assert out is not None and out[0] == span
    report = req.customized_info[REPORT_KEY][0]
    assert report["outcome"] == "blended" and report["marked_used"] == 3
    # The span's KV in the pool is what the blend computes from the same prefix.
    plan = rig.blender.plan(rig.tenant, rig.prompt, HEAD,
                            locate_chunks(np.asarray(rig.prompt), rig.docs))
    assert isinstance(plan, BlendPlan)
    want = rig.blender.run(rig.tenant, plan, rig.prompt, prefix)
    assert isinstance(want, BlendOutput)
    slots = rig.tree.path_device_indices(out[1])[HEAD:]
    got_k, got_v = rig.loader.pool.read_tokens(slots)
    torch.testing.assert_close(got_k, want.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_v, want.v, rtol=1e-5, atol=1e-5)
    assert rig.tree.protected_size() == 0          # the job's lock was given back
    assert rig.alloc.available_size() + rig.tree.evictable_size() == rig.total


def test_a_request_aborted_while_its_blend_runs_unlocks_its_prefix(rig: Rig) -> None:
    rig.insert_head()
    req = rig.request("gone")
    _, out = rig.admit(req)
    assert out is None and rig.tree.protected_size() == HEAD
    rig.tree.release_aborted_request(req.cache_request_handle)   # SGLang's abort of a waiter
    assert rig.tree.protected_size() == 0
    rig.gate.set()
    assert rig.alloc.available_size() + rig.tree.evictable_size() == rig.total
    # Another request for the same prompt blends from scratch and is admitted.
    _, out = rig.admit_when_blended(rig.request("next"))
    assert out is not None and out[0] == len(rig.prompt) - 1 - HEAD


# ------------------------------------------------------------- BlendJobs, the contract alone
def _plan(start: int, end: int) -> BlendPlan:
    return BlendPlan(start, end, (), BlendReport(Outcome.NOTHING_STORED, start, end))


class _Locks:
    def __init__(self) -> None:
        self.held: dict[str, int] = {}

    def lock(self, node: str) -> None:
        self.held[node] = self.held.get(node, 0) + 1

    def unlock(self, node: str) -> None:
        self.held[node] -= 1
        assert self.held[node] >= 0, "unlocked more often than locked"


def test_jobs_start_once_per_plan_and_give_every_lock_back_once() -> None:
    locks, started = _Locks(), []
    jobs = BlendJobs(locks.lock, locks.unlock)

    def start(result: object = "kv") -> Any:
        def submit() -> cf.Future[Any]:
            started.append(result)
            f: cf.Future[Any] = cf.Future()
            f.set_running_or_notify_cancel()
            return f
        return submit

    assert isinstance(jobs.poll("a", "n1", _plan(0, 10), start()), Running)
    assert isinstance(jobs.poll("a", "n1", _plan(0, 10), start()), Running)
    assert len(started) == 1 and locks.held == {"n1": 1}
    assert jobs.started("a", "n1") == _plan(0, 10) and jobs.started("a", "n2") is None
    assert jobs.started("b", "n1") is None
    # Another plan or node: the old job is dropped (its lock given back), a new one started.
    jobs.poll("a", "n2", _plan(0, 10), start())
    assert len(started) == 2 and locks.held == {"n1": 0, "n2": 1}
    assert jobs.take("a") is None                  # not finished: nothing to take
    jobs.drop("a")
    jobs.drop("a")
    assert locks.held["n2"] == 0 and len(jobs) == 0
    # Finished: Ready, then take gives the output and the lock back.
    done: cf.Future[Any] = cf.Future()
    done.set_result("kv")
    state = jobs.poll("b", "n1", _plan(3, 9), lambda: done)
    assert state == Ready("kv") and locks.held["n1"] == 1
    assert jobs.take("b") == "kv" and locks.held["n1"] == 0 and len(jobs) == 0
    # At most MAX_JOBS started; a request past them waits without starting.
    for i in range(MAX_JOBS + 1):
        jobs.poll(f"r{i}", "n1", _plan(0, 10), start())
    assert len(jobs) == MAX_JOBS and locks.held["n1"] == MAX_JOBS
    jobs.clear()                                   # the tree was reset: nothing to unlock
    assert len(jobs) == 0


def test_a_close_call_is_blended_once_then_computed_as_usual(rig: Rig) -> None:
    # SGLang matches a waiting request more than once a pass; a blend that ends unblended
    # (here every blend is a close call) must not be planned and started again (it was,
    # forever: the request never ran).
    rig.blender.fallback_entropy = 0.0
    rig.gate.set()
    req = rig.request("close")
    deadline = time.monotonic() + 60
    while not rig.tree.blend_jobs.settled("close"):
        assert time.monotonic() < deadline, "the close call never settled"
        rig.admit(req)
        rig.tree.blend_jobs.wait(0.02)
    for _ in range(3):                   # every later match: no blend, nothing held
        m, out = rig.admit(req)
        assert m.host_hit_length == 0 and out == (0, m.last_device_node)
    assert len(rig.blend_threads) == 1 and len(rig.tree.blend_jobs) == 0
    report = req.customized_info[REPORT_KEY][0]
    assert report["outcome"] == "close_call" and report["first_token_entropy"] > 0
    assert rig.blender.counters["close_calls"] == 1
    rig.tree.on_release(types.SimpleNamespace(cache_request_handle="close", rid="close",
                                              finished=lambda: True), checkpointed=False)
    assert not rig.tree.blend_jobs.settled("close")          # forgotten when it leaves
