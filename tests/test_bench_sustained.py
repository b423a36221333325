"""sgl-kvext-bench sustained: which rate a configuration sustains at the TTFT goal, and its
options (the measurement itself starts servers: docs/benchmarks.md has the run)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sgl_kvext_bench.cli import main
from sgl_kvext_bench.sustained import decided, sustained_rates


def _run(name: str, offered: float, achieved: float, p90: float) -> dict:
    return {"name": name, "offered_rps": offered, "achieved_rps": achieved, "ttft_p90_s": p90}


def test_the_sustained_rate_is_the_highest_kept_up_within_the_goal() -> None:
    runs = [_run("radix", 0.5, 0.5, 0.6), _run("hierarchical", 0.5, 0.5, 0.2),
            _run("radix", 1.0, 0.97, 1.4),               # over the p90 goal
            _run("hierarchical", 1.0, 0.95, 0.3),
            _run("radix", 2.0, 1.1, 0.9),                # within the goal, fell behind
            _run("hierarchical", 2.0, 1.85, 0.8),
            _run("no_cache", 0.5, 0.5, 3.0)]
    assert sustained_rates(runs, goal_p90_s=1.0) == {"radix": 0.5, "hierarchical": 2.0,
                                                     "no_cache": None}


def test_a_rate_is_sustained_only_if_every_run_at_it_and_below_kept_the_goal() -> None:
    # a queue that fell behind in one repeat of a rate, or at a lower rate, is not sustained
    runs = [_run("radix", 0.5, 0.5, 0.6), _run("radix", 0.5, 0.5, 0.7),
            _run("radix", 1.0, 1.0, 0.8), _run("radix", 1.0, 0.99, 17.7),
            _run("radix", 1.5, 1.5, 0.9), _run("radix", 1.5, 1.5, 0.9),
            _run("hierarchical", 0.5, 0.5, 3.0), _run("hierarchical", 1.0, 1.0, 0.3)]
    assert sustained_rates(runs, goal_p90_s=1.0) == {"radix": 0.5, "hierarchical": None}


def test_a_user_context_starts_every_prompt_of_its_user_only() -> None:
    from sgl_kvext_bench.multiturn import Workload, trace_requests

    work = Workload(users=3, turns=2, system_words=10, question_words=10, answer_tokens=2,
                    context_words=50)
    docs = [work.user_context(u) for u in range(3)]
    assert len(set(docs)) == 3 and all(len(d.split()) >= 50 + 3 for d in docs)
    assert all(d.startswith(f"User {u + 1}'s document: ") for u, d in enumerate(docs))
    assert docs == [Workload(users=3, context_words=50).user_context(u) for u in range(3)]
    system = work.system_prompt()
    for k, request in enumerate(trace_requests(work, 1.0)):   # round-robin over users
        user = k % 3
        assert request.prompt.startswith(system + docs[user])
        assert all(docs[u] not in request.prompt for u in range(3) if u != user)
    assert Workload(users=3).user_context(0) == ""


@pytest.mark.parametrize("argv, message", [
    (["--rates", "1,x"], "--rates '1,x': comma-separated numbers > 0"),
    (["--rates", "0,1"], "--rates must be > 0"),
    (["--goal-p90", "0"], "--goal-p90 > 0"),
    (["--configs", "radix,nope"], "--configs: unknown ['nope']"),
    (["--users", "0"], "--users"),
    (["--repeats", "0"], "--repeats"),
    (["--context-words", "-1"], "--context-words -1: must be >= 0"),
    (["--turns", "3", "--warmup-turns", "3"],
     "--warmup-turns 3: must be >= 0 and below --turns (3)"),
    (["--warmup-turns", "-1"], "--warmup-turns -1: must be >= 0 and below --turns (8)"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, argv, message) -> None:
    assert main(["sustained", "--json", str(tmp_path / "s.json"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_runs_that_cannot_change_the_sustained_rate_are_decided() -> None:
    # radix missed the goal at 1 req/s (second repeat): 1 and 2 req/s are decided for it,
    # 0.5 is not (its runs there kept the goal); hierarchical has not missed anywhere
    runs = [_run("radix", 0.5, 0.5, 0.6), _run("hierarchical", 0.5, 0.5, 0.2),
            _run("radix", 1.0, 1.0, 0.8), _run("hierarchical", 1.0, 1.0, 0.3),
            _run("radix", 1.0, 0.8, 0.9)]                # fell behind
    assert [decided(runs, "radix", r, 1.0) for r in (0.5, 1.0, 2.0)] == [False, True, True]
    assert not any(decided(runs, "hierarchical", r, 1.0) for r in (0.5, 1.0, 2.0))
    assert not decided(runs, "no_cache", 0.5, 1.0)


def test_run_workload_refuses_a_warmup_as_long_as_the_workload() -> None:
    from sgl_kvext_bench.client import Endpoint
    from sgl_kvext_bench.multiturn import Workload, run_workload

    with pytest.raises(ValueError, match=r"warmup_turns 2: must be in \[0, 1\] \(turns 2\)"):
        run_workload(Endpoint("http://127.0.0.1:9"), "radix", Workload(turns=2), print, 1.0,
                     warmup_turns=2)


@pytest.mark.bench
@pytest.mark.extended
def test_warmup_turns_are_sent_first_and_left_out(tmp_path: Path, model_path: Path) -> None:
    """On the real server: the warm-up turn of every user is answered before the measured
    clock starts, its rows say so, and the figures are the measured turns' alone."""
    out = tmp_path / "s.json"
    result = subprocess.run(
        [sys.executable, "-m", "sgl_kvext_bench.cli", "sustained", "--json", str(out),
         "--configs", "hierarchical", "--users", "2", "--turns", "3", "--warmup-turns", "1",
         "--rates", "0.5", "--goal-p90", "30", "--system-words", "30", "--question-words", "10",
         "--answer-tokens", "3"],
        capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["warmup_turns"] == 1 and data["sustained_rps"] == {"hierarchical": 0.5}
    (run,) = data["runs"]
    rows = run["requests"]
    assert sorted((r["turn"], r["measured"]) for r in rows) == [
        (1, False), (1, False), (2, True), (2, True), (3, True), (3, True)]
    measured = [r for r in rows if r["measured"]]
    assert min(r["sent_s"] for r in measured) < 1.0         # the clock started after warm-up
    assert all(r["cached_tokens"] > 0 for r in measured)     # their history was cached
    ordered = sorted(r["ttft_s"] for r in measured)
    assert run["ttft_p90_s"] == ordered[-1] and run["ttft_p50_s"] == pytest.approx(
        (ordered[1] + ordered[2]) / 2)
