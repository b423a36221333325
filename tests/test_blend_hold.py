"""A blend-namespace request whose marked documents are below host memory (evicted there by
pages, or never promoted) is held while they come up, then blended: marked chunks are not
silently run unblended. Real tiers (host over disk), a random-weight Llama (the blend math
is tested elsewhere: here only which fragments are where)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from sgl_kvext.blend import PrefixKV
from sgl_kvext.fragments.blender import BlendOutput, BlendPlan, FragmentBlender
from sgl_kvext.fragments.index import FragmentIndex, locate_chunks
from sgl_kvext.fragments.report import Outcome
from sgl_kvext.fragments.store import FragmentStore, KVLayout
from sgl_kvext.pages.cost_model import CostModel
from sgl_kvext.pages.keys import ModelIdentity, Tenant
from sgl_kvext.sglang_plugin.blend_loader import BlendLoader
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.disk import DiskTier
from sgl_kvext.tiers.host import HostTier
from sgl_kvext_bench.random_llama import RandomLlamaOps


def test_a_request_is_held_while_its_marked_documents_come_up_then_blended(
        tmp_path: Path) -> None:
    ops = RandomLlamaOps(layers=8)
    layout = KVLayout(ops.num_layers, ops.kv_heads, ops.head_dim, ops.dtype)
    chain = TierChain([HostTier(64 << 20), DiskTier(tmp_path / "disk", 1 << 30, bytes(32),
                                                    codec="none")], "write_through")
    store = FragmentStore(chain, ModelIdentity("c", "w", "float32", 1, "mha"), layout)
    blender = FragmentBlender(ops, ops.rope, store, FragmentIndex(16, "explicit"))
    loader = BlendLoader(blender, pool=None)  # type: ignore[arg-type]  (no pool: not written)
    try:
        tenant, rng = Tenant(blend=True), np.random.default_rng(0)
        docs = [rng.integers(0, 1000, 80) for _ in range(3)]
        keys, _ = blender.prewarm_async(tenant, docs)      # durable: in host memory and disk
        deadline = time.monotonic() + 60
        while not all(blender.index.known(k) for k in keys):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        chain.tiers[0].delete(keys[:2])                     # evicted from host memory
        prompt = np.concatenate([rng.integers(0, 1000, 5), *docs, rng.integers(0, 1000, 9)])
        plan = blender.plan(tenant, prompt, 0, locate_chunks(prompt, docs))
        assert isinstance(plan, BlendPlan) and len(plan.fragments) == 3
        cost = CostModel(["host", "disk"], "cpu")
        cost.prefill_tps = 1.0                              # recomputing is slow: wait
        assert loader.hold("r", plan, cost, bytes_per_token=1.0)   # two are coming up
        assert store.wait_promotions(30.0)
        assert not loader.hold("r", plan, cost, bytes_per_token=1.0)   # all in host memory
        empty = torch.empty((ops.num_layers, 0, ops.kv_heads, ops.head_dim))
        out = blender.run(tenant, plan, prompt, PrefixKV(empty, empty))
        assert isinstance(out, BlendOutput) and out.report.outcome is Outcome.BLENDED
        assert out.report.fragments_missing == 0
        # Recomputing faster than any load: no wait at all.
        chain.tiers[0].delete(keys[:1])
        cost.prefill_tps = 1e12
        assert not loader.hold("s", plan, cost, bytes_per_token=1.0)
    finally:
        blender.close()
        chain.close()
