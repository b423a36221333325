"""Device placement: the blend, the fragment store and blender, and the page tiering make
every tensor on an explicit device (the model's or the pool's), so they run unchanged with a
CUDA model and pool.

Each test runs its path with the model / pool on the CPU while torch's default device is
``meta`` (the ``meta_default_device`` fixture): a tensor made on the default device meets a
CPU tensor and raises. Results are compared with the same run without the fixture, so the
checks also prove the path computed something. The same paths run on a real GPU in
``bench/gpu/checks.py``.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from sgl_kvext.blend import (
    BlendSettings,
    PrefixKV,
    ReusedChunk,
    blended_prefill,
    compute_chunk_kv,
    full_prefill,
)
from sgl_kvext.blend.decode import greedy_continue
from sgl_kvext.fragments.blender import BlendOutput, BlendPlan, FragmentBlender
from sgl_kvext.fragments.index import FragmentIndex, locate_chunks
from sgl_kvext.fragments.store import FragmentStore, KVLayout
from sgl_kvext.pages.keys import DEFAULT_TENANT, ModelIdentity, Tenant
from sgl_kvext.pages.kv_pages import PagedKV
from sgl_kvext.pages.plans import LoadOutcome, LoadPlan
from sgl_kvext.pages.tiering import KVTiering
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.host import HostTier
from sgl_kvext_bench.random_llama import RandomLlamaOps

CPU = torch.device("cpu")


def blend_everything(ops: RandomLlamaOps) -> list[torch.Tensor]:
    """Full, blended (with a prefix, shifted positions, a chunk's part) prefills and a
    greedy continuation; their KV and logits."""
    g = torch.Generator(device=CPU).manual_seed(1)
    ids = torch.randint(0, 1000, (160,), generator=g, device=CPU)
    a, b = compute_chunk_kv(ops, ids[20:70]), compute_chunk_kv(ops, ids[80:140])
    chunks = [ReusedChunk(20, a), ReusedChunk(85, b.part(5, 60))]
    pos = torch.arange(160, device=CPU) + 7
    shifted = blended_prefill(ops, ids, chunks, ops.rope, positions=pos,
                              settings=BlendSettings(0.2, check_layer=1, query_share=0.5))
    whole = full_prefill(ops, ids)
    prefix = PrefixKV(whole.k[:, :10], whole.v[:, :10])
    after = blended_prefill(ops, ids[10:], [ReusedChunk(c.start - 10, c.kv) for c in chunks],
                            ops.rope, prefix=prefix)
    tokens = greedy_continue(ops, after, 160, 4)
    return [shifted.k, shifted.v, shifted.last_logits, whole.last_logits, after.k,
            after.last_logits, torch.tensor(tokens, device=CPU)]


def test_the_blend_makes_no_tensor_on_the_default_device() -> None:
    ops = RandomLlamaOps(layers=8, device=CPU)
    expected = blend_everything(ops)
    torch.set_default_device("meta")
    try:
        got = blend_everything(ops)
    finally:
        torch.set_default_device(None)
    for want, have in zip(expected, got, strict=True):
        assert have.device == CPU
        torch.testing.assert_close(have, want, rtol=0, atol=0)


def wait_known(blender: FragmentBlender, keys: list[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(blender.index.known(k) for k in keys):
        assert time.monotonic() < deadline, "fragments never registered"
        time.sleep(0.01)


def test_fragment_store_and_blender_hand_kv_out_on_the_model_device(
        meta_default_device: None) -> None:
    ops = RandomLlamaOps(layers=8, device=CPU)
    layout = KVLayout(ops.num_layers, ops.kv_heads, ops.head_dim, ops.dtype)
    identity = ModelIdentity("c", "w", "float32", 1, "mha")
    store = FragmentStore(TierChain([HostTier(64 << 20)]), identity, layout, device=CPU)
    blender = FragmentBlender(ops, ops.rope, store, FragmentIndex(16, "explicit"))
    try:
        tenant = Tenant(blend=True)
        rng = np.random.default_rng(0)
        docs = [rng.integers(0, 1000, 60) for _ in range(2)]
        chunk = compute_chunk_kv(ops, torch.from_numpy(docs[0]))
        key = store.put(tenant, chunk)
        got = store.get(tenant, [torch.from_numpy(docs[0]), docs[1]])
        assert list(got) == [0] and got[0].k.device == CPU and key == store.key(tenant, docs[0])
        torch.testing.assert_close(got[0].k, chunk.k, rtol=0, atol=0)
        # The registration worker's thread does not see this thread's default device: its
        # step (compute, put, get) ran above on this thread.
        keys, _ = blender.prewarm_async(tenant, docs)
        wait_known(blender, keys)
        prompt = np.concatenate([rng.integers(0, 1000, 9), *docs, rng.integers(0, 1000, 11)])
        plan = blender.plan(tenant, prompt, 4, locate_chunks(prompt, docs))
        assert isinstance(plan, BlendPlan)
        whole = full_prefill(ops, torch.from_numpy(prompt[:4]))
        out = blender.run(tenant, plan, prompt, PrefixKV(whole.k, whole.v))
        assert isinstance(out, BlendOutput) and out.k.device == CPU
        assert out.k.shape[1] == plan.tokens and out.report.reused_tokens > 0
    finally:
        blender.close()


def test_tiering_spills_and_loads_without_the_default_device(meta_default_device: None) -> None:
    layers, slots, tokens = 2, 256, 8
    g = torch.Generator(device=CPU).manual_seed(0)
    k = [torch.randn(slots, 2, 16, generator=g, device=CPU) for _ in range(layers)]
    v = [torch.randn(slots, 2, 16, generator=g, device=CPU) for _ in range(layers)]
    paged = PagedKV(k, v, tokens)
    tiering = KVTiering(paged, TierChain([HostTier(8 * paged.page_nbytes,
                                                   block_bytes=paged.page_nbytes)]),
                        ModelIdentity("c", "w", "float32", tokens, "mha"), prefetch_threads=1)
    try:
        toks = list(range(1, 45))                      # 5 pages and a partial one
        src = torch.arange(0, 44, device=CPU)
        dst = torch.arange(100, 144, device=CPU)
        assert tiering.spill(DEFAULT_TENANT, toks, src, 0) == 6
        plan = tiering.plan(DEFAULT_TENANT, toks, 0)
        assert isinstance(plan, LoadPlan) and plan.end == 44
        assert tiering.load(plan, dst) is LoadOutcome.LOADED
        for buf in (*k, *v):
            torch.testing.assert_close(buf[dst], buf[src], rtol=0, atol=0)
    finally:
        tiering.close()
