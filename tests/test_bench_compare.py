"""`sgl-kvext-bench compare`: two quality runs over the same prompts, offline and server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import bench_cli

from sgl_kvext_bench.quality import compare
from sgl_kvext_bench.report import write_csv

WORKLOAD = {"corpus": "synthetic", "questions": 4, "documents": 8, "seed": 0}


def _offline(tmp_path: Path, outcomes: list[tuple[bool, bool]]) -> Path:
    """A blend results JSON + CSV (the CSV holds the rows, written as `blend` writes them)."""
    path = tmp_path / "offline.json"
    path.write_text(json.dumps({"workload": WORKLOAD, "runs": [{"method": "cacheblend"}]}))
    write_csv([{"method": "cacheblend", "ratio": 0.15, "question": i + 1,
                "exact_correct": exact, "blend_correct": blend, "kl": 0.01 * (i + 1),
                "top1_agree": exact == blend} for i, (exact, blend) in enumerate(outcomes)],
              path.with_suffix(".csv"))
    return path


def _server(tmp_path: Path, outcomes: list[tuple[bool, bool]], cached: list[int]) -> Path:
    rows = [{"exact_correct": e, "correct": b, "kl": 0.02, "top1_agree": e == b,
             "kvext_blend": {"outcome": "blended", "start": c} if c else None}
            for (e, b), c in zip(outcomes, cached, strict=True)]
    path = tmp_path / "server.json"
    path.write_text(json.dumps({"workload": WORKLOAD, "configs": [
        {"name": "hierarchical_blend", "quality": {"questions": 4}, "questions": rows}]}))
    return path


def test_the_server_losing_one_more_question_is_reported_paired(tmp_path: Path) -> None:
    offline = _offline(tmp_path, [(True, True), (True, False), (False, False), (True, True)])
    server = _server(tmp_path, [(True, True), (True, False), (False, False), (True, False)],
                     [17, 17, 300, 0])
    out = tmp_path / "cmp.json"
    done = bench_cli("compare", str(offline), str(server), "--json", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["a"]["accuracy_delta"] == -0.25 and result["b"]["accuracy_delta"] == -0.5
    assert result["loss_difference"] == -0.25               # one question in four
    assert result["loss_difference_stderr"] == pytest.approx(0.25)
    assert result["within_one_stderr"]                      # -0.25 >= -0.25: not beyond
    assert result["b"]["flipped_to_wrong"] == [2, 4]
    split = result["b_inherited"]
    assert split["head_tokens"] == 17
    assert split["head_only"]["questions"] == 2 and split["inherited"]["questions"] == 1
    assert split["not_blended"]["questions"] == 1
    assert "a_inherited" not in result                     # offline rows have no prefix


def test_runs_over_different_prompts_are_refused_in_one_line(tmp_path: Path) -> None:
    offline = _offline(tmp_path, [(True, True)] * 4)
    other = json.loads(offline.read_text()) | {"workload": {**WORKLOAD, "seed": 1}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    (tmp_path / "other.csv").write_text(offline.with_suffix(".csv").read_text())
    done = bench_cli("compare", str(offline), str(tmp_path / "other.json"),
                     "--json", str(tmp_path / "out.json"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "different questions" in done.stderr


def test_a_missing_run_or_file_names_what_is_missing(tmp_path: Path) -> None:
    offline = _offline(tmp_path, [(True, True)] * 4)
    done = bench_cli("compare", str(offline), str(offline), "--method", "gradual2",
                     "--json", str(tmp_path / "out.json"))
    assert done.returncode == 2 and "no run gradual2 @ 0.15" in done.stderr
    done = bench_cli("compare", str(offline), str(tmp_path / "nope.json"),
                     "--json", str(tmp_path / "out.json"))
    assert done.returncode == 2 and "nope.json: not a readable results JSON" in done.stderr
    server = _server(tmp_path, [(True, True)] * 4, [0] * 4)
    with pytest.raises(ValueError, match="no quality columns for 'hierarchical_blend_auto'"):
        compare(json.loads(server.read_text()), json.loads(server.read_text()),
                config="hierarchical_blend_auto")


def test_two_methods_of_one_sweep_are_compared_paired(tmp_path: Path) -> None:
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"workload": WORKLOAD, "runs": [{"method": "cacheblend"}]}))
    write_csv([{"method": m, "ratio": 0.15, "question": i + 1, "exact_correct": True,
                "blend_correct": m == "check6_query_half" or i < 2, "kl": kl * (i + 1),
                "top1_agree": True}
               for m, kl in (("cacheblend", 0.1), ("check6_query_half", 0.05))
               for i in range(4)], path.with_suffix(".csv"))
    out = tmp_path / "cmp.json"
    done = bench_cli("compare", str(path), str(path), "--method", "cacheblend",
                     "--method-b", "check6_query_half", "--json", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["a"]["blend_accuracy"] == 0.5 and result["b"]["blend_accuracy"] == 1.0
    assert result["loss_difference"] == 0.5                    # b answers 2 of 4 more
    assert result["kl_difference"] == pytest.approx(-0.125)    # -0.05 x (1+2+3+4) / 4
    assert "first-token KL minus" in done.stdout
