"""sgl-kvext-bench gate: a blend run's quality and TTFT had its close calls been prefilled
again, exactly (the outcome per prompt follows from the run's own rows)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sgl_kvext_bench.cli import main
from sgl_kvext_bench.fallback_gate import gate_curve


def _row(q: int, entropy: float, exact_ok: bool, blend_ok: bool, kl: float, top1: bool,
         method: str = "m") -> dict:
    # CSV rows come back as strings: the gate reads both
    return {"method": method, "ratio": "0.1500", "question": str(q),
            "exact_correct": "1" if exact_ok else "0", "blend_correct": blend_ok,
            "kl": kl, "top1_agree": top1, "ttft_s": "0.5", "full_ttft_s": 1.5,
            "blend_entropy": str(entropy), "fell_back": "False"}


ROWS = [_row(1, 0.2, True, True, 0.01, True), _row(2, 2.5, True, False, 0.40, False),
        _row(3, 1.2, False, True, 0.05, True), _row(4, 3.0, False, False, 0.30, True),
        _row(5, 9.0, True, True, 0.0, True, method="other")]


def test_without_a_gate_the_run_is_as_measured() -> None:
    (never,) = gate_curve(ROWS, "m", 0.15, [math.inf])
    assert never["fallback_share"] == 0 and never["ttft_mean_s"] == 0.5
    assert never["blend_accuracy"] == 0.5 and never["kl_mean"] == pytest.approx(0.19)
    assert never["top1_agreement"] == 0.75


def test_prompts_above_the_gate_take_the_exact_answer_at_both_prefills_time() -> None:
    (gated,) = gate_curve(ROWS, "m", 0.15, [2.0])       # questions 2 and 4 prefilled again
    assert gated["fallback_share"] == 0.5
    assert gated["kl_mean"] == pytest.approx((0.01 + 0.05) / 4)
    assert gated["kl_median"] == pytest.approx(0.005)
    assert gated["blend_accuracy"] == 0.75            # 2 now right as exact; 3 stays right
    assert gated["accuracy_delta"] == 0.25 and gated["top1_agreement"] == 1.0
    assert gated["ttft_mean_s"] == pytest.approx(1.25) and gated["ttft_p90_s"] == 2.0
    (everything,) = gate_curve(ROWS, "m", 0.15, [0.0])
    assert everything["kl_mean"] == 0 and everything["accuracy_delta"] == 0


def test_a_run_without_entropies_or_of_another_method_is_refused() -> None:
    with pytest.raises(ValueError, match="no rows of method 'x'"):
        gate_curve(ROWS, "x", 0.15, [1.0])
    old = [{k: v for k, v in r.items() if k != "blend_entropy"} for r in ROWS]
    with pytest.raises(ValueError, match="blend_entropy"):
        gate_curve(old, "m", 0.15, [1.0])
    gated_run = [{**r, "fell_back": True} for r in ROWS]
    with pytest.raises(ValueError, match="without a gate"):
        gate_curve(gated_run, "m", 0.15, [1.0])


def test_gate_command_writes_the_curve_and_rejects_bad_thresholds(tmp_path: Path) -> None:
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"runs": [], "rows": ROWS}))
    out = tmp_path / "gate.json"
    assert main(["gate", str(run), "--method", "m", "--thresholds", "inf,2",
                 "--json", str(out)]) == 0
    curve = json.loads(out.read_text())["curve"]
    assert [c["fallback_share"] for c in curve] == [0.0, 0.5]
    assert main(["gate", str(run), "--thresholds", "1,-2", "--json", str(out)]) == 2
    assert main(["gate", str(run), "--method", "nope", "--json", str(out)]) == 2
