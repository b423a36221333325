"""Which fragments a plan queues for registration: a marked one at its first sighting, an
automatic one once seen at a second position (the same prompt planned again, as a queued
request is on every scheduler pass, or sent again, queues none). A random-weight Llama over
a real host tier."""

from __future__ import annotations

import time

import numpy as np
import pytest

from sgl_kvext.fragments.blender import FragmentBlender
from sgl_kvext.fragments.index import FragmentIndex, locate_chunks
from sgl_kvext.fragments.store import FragmentStore, KVLayout
from sgl_kvext.pages.keys import ModelIdentity, Tenant
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.host import HostTier
from sgl_kvext_bench.random_llama import RandomLlamaOps

pytestmark = pytest.mark.unit


def _settled(blender: FragmentBlender, timeout_s: float = 60.0) -> dict[str, int]:
    """The blender's counters once nothing waits for registration."""
    deadline = time.monotonic() + timeout_s
    while blender.registrar.busy:               # keys queued or being registered
        assert time.monotonic() < deadline, "registration did not finish"
        time.sleep(0.01)
    return dict(blender.counters)


def test_automatic_fragments_register_at_a_second_position_marked_ones_at_once() -> None:
    ops = RandomLlamaOps(layers=4)
    layout = KVLayout(ops.num_layers, ops.kv_heads, ops.head_dim, ops.dtype)
    store = FragmentStore(TierChain([HostTier(64 << 20)]),
                          ModelIdentity("c", "w", "float32", 1, "mha"), layout)
    blender = FragmentBlender(ops, ops.rope, store, FragmentIndex(16, "both"))
    try:
        tenant, rng = Tenant(blend=True), np.random.default_rng(1)
        prompt = rng.integers(0, 1000, 400)
        for _ in range(3):                  # planned on three passes, or sent three times
            blender.plan(tenant, prompt, 0)
        first = _settled(blender)
        assert first["registered"] == 0 and first["seen_once"] > 0
        moved = np.concatenate([rng.integers(0, 1000, 7), prompt])   # 7 tokens later
        blender.plan(tenant, moved, 0)
        second = _settled(blender)

        def cuts(ids: np.ndarray) -> set[bytes]:
            return {m.key for m in blender.index.find(lambda t: store.key(tenant, t), ids).matches}

        before, after = cuts(prompt), cuts(moved)
        assert len(before & after) >= len(before) - 1 > 0        # the chunks move along
        assert second["registered"] == len(before & after)        # each moved one, once
        assert second["seen_once"] == first["seen_once"] + len(after - before)
        # A marked chunk is registered at its first sighting; what it covers is not
        # chunked automatically.
        doc = rng.integers(0, 1000, 120)
        other = np.concatenate([rng.integers(0, 1000, 30), doc, rng.integers(0, 1000, 30)])
        blender.plan(tenant, other, 0, locate_chunks(other, [doc]))
        third = _settled(blender)
        assert third["registered"] == second["registered"] + 1
    finally:
        blender.close()
