"""The cost model: moving averages and the wait budget."""

from __future__ import annotations

import pytest

from sgl_kvext.pages.cost_model import CostModel


def test_first_observation_replaces_the_guess_then_averages() -> None:
    model = CostModel(["host", "disk"], "cpu", alpha=0.5)
    model.observe_prefill(1000, 2.0)
    assert model.prefill_tps == 500.0
    model.observe_prefill(1000, 1.0)
    assert model.prefill_tps == 750.0
    model.observe_prefill(5, 0.001)                 # too small to mean anything: ignored
    assert model.prefill_tps == 750.0
    model.observe_load(1, 10**9, 1.0)
    assert model.load_s(10**9, 1) == pytest.approx(1.0)


def test_wait_budget() -> None:
    model = CostModel(["host", "s3"], "cpu")
    model.prefill_tps = 1000.0                      # 1,000 tokens: 1 s to recompute
    model.tier_bps[1] = 100e6                       # 1,000 tokens x 23 KB: 0.23 s to load
    budget = model.hold_budget_s(1000, 23_000, cap_s=30)
    assert budget == pytest.approx(min(1.0, 3 * 0.23 + 0.25))
    assert model.hold_budget_s(1000, 23_000, cap_s=0.1) == 0.1
    assert model.hold_budget_s(1000, 23_000, cap_s=30, local=True) == pytest.approx(1.0)
    model.tier_bps[1] = 10e6                        # now 2.3 s to load: recompute instead
    assert model.hold_budget_s(1000, 23_000, cap_s=30) == 0.0
