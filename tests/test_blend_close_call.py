"""Close calls: a blend whose first-token distribution is uncertain is thrown away and its span
computed exactly. The entropy itself, and the blender's gate on it (real tiers, a random-weight
Llama: which outcome, what is reported, what KV comes back)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from sgl_kvext.blend import (
    PrefixKV,
    ReusedChunk,
    blended_prefill,
    check_threshold,
    first_token_entropy,
)
from sgl_kvext.fragments.blender import BlendOutput, BlendPlan, FragmentBlender, NoBlend
from sgl_kvext.fragments.index import FragmentIndex, locate_chunks
from sgl_kvext.fragments.report import Outcome
from sgl_kvext.fragments.store import FragmentStore, KVLayout
from sgl_kvext.pages.keys import ModelIdentity, Tenant
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.host import HostTier
from sgl_kvext_bench.random_llama import RandomLlamaOps


def test_entropy_is_zero_for_a_certain_token_and_log_vocab_for_a_uniform_one() -> None:
    assert first_token_entropy(torch.tensor([0.0, 80.0, 0.0])) == pytest.approx(0.0, abs=1e-12)
    assert first_token_entropy(torch.zeros(1000)) == pytest.approx(math.log(1000))
    assert 0 < first_token_entropy(torch.tensor([2.0, 1.0, 0.0])) < math.log(3)
    assert first_token_entropy(torch.zeros(8, dtype=torch.bfloat16)) == pytest.approx(
        math.log(8))


def test_a_gate_must_be_a_non_negative_entropy() -> None:
    assert check_threshold(math.inf) == math.inf and check_threshold(0.0) == 0.0
    for bad in (-0.5, math.nan):
        with pytest.raises(ValueError, match="must be >= 0 nats"):
            check_threshold(bad)


def _blend(fallback_entropy: float) -> tuple[FragmentBlender, BlendPlan, np.ndarray,
                                              BlendOutput | NoBlend]:
    ops = RandomLlamaOps(layers=8)
    layout = KVLayout(ops.num_layers, ops.kv_heads, ops.head_dim, ops.dtype)
    store = FragmentStore(TierChain([HostTier(64 << 20)]),
                          ModelIdentity("c", "w", "float32", 1, "mha"), layout)
    blender = FragmentBlender(ops, ops.rope, store, FragmentIndex(16, "explicit"),
                              fallback_entropy=fallback_entropy)
    tenant, rng = Tenant(blend=True), np.random.default_rng(1)
    docs = [rng.integers(0, 1000, 60) for _ in range(2)]
    keys, _ = blender.prewarm_async(tenant, docs)
    deadline = time.monotonic() + 60
    while not all(blender.index.known(k) for k in keys):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    prompt = np.concatenate([rng.integers(0, 1000, 5), *docs, rng.integers(0, 1000, 7)])
    plan = blender.plan(tenant, prompt, 0, locate_chunks(prompt, docs), page_size=4)
    assert isinstance(plan, BlendPlan) and plan.end < len(prompt) - 1     # a tail after it
    empty = torch.empty((ops.num_layers, 0, ops.kv_heads, ops.head_dim))
    return blender, plan, prompt, blender.run(tenant, plan, prompt, PrefixKV(empty, empty))


def test_without_a_close_call_the_span_is_blended_through_the_prompts_end() -> None:
    blender, plan, prompt, out = _blend(math.inf)
    try:
        assert isinstance(out, BlendOutput) and out.report.outcome is Outcome.BLENDED
        # The span's KV is the blend of the whole prompt cut at the span's end; the entropy
        # reported is that of the prompt's own first token.
        found = blender.store.get(Tenant(blend=True), [torch.from_numpy(prompt[m.start:m.end])
                                                        for m in plan.fragments])
        assert len(found) == len(plan.fragments)
        assert out.k.shape[1] == plan.tokens
        whole = blended_prefill(blender.ops, torch.from_numpy(prompt),
                                [ReusedChunk(m.start, found[i]) for i, m in
                                 enumerate(plan.fragments)], blender.rope,
                                settings=blender.settings)
        torch.testing.assert_close(out.k, whole.k[:, :plan.tokens])
        assert out.report.first_token_entropy == pytest.approx(
            first_token_entropy(whole.last_logits))
        assert out.report.recomputed_tokens == whole.recomputed_tokens - (len(prompt)
                                                                          - plan.tokens)
        assert blender.counters["blends"] == 1 and blender.counters["close_calls"] == 0
    finally:
        blender.close()


def test_a_close_call_is_computed_in_full_and_says_so() -> None:
    blender, _, _, out = _blend(0.0)        # any uncertainty at all is a close call
    try:
        assert isinstance(out, NoBlend) and out.report.outcome is Outcome.CLOSE_CALL
        entropy = out.report.first_token_entropy
        assert entropy is not None and entropy > 0
        assert out.report.as_dict()["outcome"] == "close_call"
        assert blender.counters["close_calls"] == 1 and blender.counters["blends"] == 0
        assert blender.counters["blended_tokens"] == 0
    finally:
        blender.close()
