"""sgl-kvext-bench replay: trace files (round trip, named errors) and a tiny open-loop replay
against a real server; rag --export-trace writes a trace replay accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import bench_cli

from sgl_kvext_bench.replay import TraceError, TraceRequest, load_trace, write_trace


def test_trace_round_trip_in_arrival_order(tmp_path: Path) -> None:
    reqs = [TraceRequest(2.0, "second", 4), TraceRequest(0.5, [1, 2, 3], 1, ("a chunk",))]
    loaded = load_trace(write_trace(reqs, tmp_path / "t.jsonl"))
    assert loaded == sorted(reqs, key=lambda r: r.arrival_s)


@pytest.mark.parametrize("line, needle", [
    ('{"prompt": "x"}', "output_tokens"),
    ('{"prompt": "x", "input_ids": [1], "output_tokens": 1}', "exactly one"),
    ('{"input_ids": [1, -2], "output_tokens": 1}', "input_ids"),
    ('{"prompt": "x", "output_tokens": 1, "arrival_s": -1}', "arrival_s"),
    ('{"prompt": "x", "output_tokens": 1, "chunks": "abc"}', "chunks"),
    ('{"prompt": "x", "output_tokens": 1, "temperature": 1}', "temperature"),
    ('[1, 2]', "JSON object"),
    ('{"prompt": ', "not JSON"),
])
def test_bad_trace_lines_are_named(tmp_path: Path, line: str, needle: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine", "output_tokens": 2}\n' + line + "\n")
    with pytest.raises(TraceError, match="line 2") as err:
        load_trace(path)
    assert needle in str(err.value)


def test_replay_cli_refuses_a_bad_trace_in_one_line(tmp_path: Path) -> None:
    missing = bench_cli("replay", str(tmp_path / "none.jsonl"), "--json", str(tmp_path / "x.json"))
    assert missing.returncode == 2 and "cannot read trace" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_rag_export_trace_is_replayable(tmp_path: Path) -> None:
    out = tmp_path / "rag.jsonl"
    result = bench_cli("rag", "--json", str(tmp_path / "unused.json"), "--export-trace", str(out),
                  "--questions", "3", "--documents", "8", "--sentences", "4",
                  "--trace-interval-s", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    reqs = load_trace(out)
    assert [r.arrival_s for r in reqs] == [0.0, 2.0, 4.0]
    assert all(r.chunks and all(c in r.prompt for c in r.chunks) for r in reqs)


@pytest.mark.parametrize("command, sizes, n", [
    ("multiturn", ["--users", "2", "--turns", "3", "--system-words", "20"], 6),
    ("code", ["--functions", "10", "--edits", "4"], 4),
])
def test_workloads_export_replayable_traces(tmp_path: Path, command: str, sizes: list[str],
                                            n: int) -> None:
    out = tmp_path / f"{command}.jsonl"
    result = bench_cli(command, "--json", str(tmp_path / "unused.json"), "--export-trace", str(out),
                  "--trace-interval-s", "0.5", *sizes)
    assert result.returncode == 0, result.stderr[-2000:]
    reqs = load_trace(out)
    assert [r.arrival_s for r in reqs] == [0.5 * i for i in range(n)]
    assert not (tmp_path / "unused.json").exists()          # nothing was run
    if command == "multiturn":       # a user's later turn extends its earlier prompt
        assert reqs[2].prompt.startswith(reqs[0].prompt)


@pytest.mark.bench
@pytest.mark.extended
def test_replay_tiny(tmp_path: Path, model_path: Path) -> None:
    story = "The lighthouse keeper counted ships every evening and wrote them down. " * 12
    trace = write_trace([TraceRequest(0.0, story + "How many?", 6),
                         TraceRequest(0.1, "List three colors:", 6),
                         TraceRequest(6.0, story + "Who counted?", 6)], tmp_path / "t.jsonl")
    out = tmp_path / "replay.json"
    result = bench_cli("replay", str(trace), "--json", str(out), "--configs", "radix",
                  "--model-path", str(model_path), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| configuration | requests |" in result.stdout
    (radix,) = json.loads(out.read_text())["configs"]
    assert radix["name"] == "radix" and radix["requests"] == 3 and radix["errors"] == 0
    assert {"ttft_p50_s", "ttft_p99_s", "itl_p50_s", "output_tokens_per_s"} <= set(radix)
    assert radix["output_tokens_per_s"] > 0
    third = radix["per_request"][2]            # same story as the first: found in the tree
    assert third["cached_tokens"] >= third["prompt_tokens"] - 12
