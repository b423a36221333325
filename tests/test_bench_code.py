"""sgl-kvext-bench code: edits land near the end of the file; a tiny run on a real server
reuses the file up to each edit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from server_pool import SERVE_ARGS, ServerPool

from sgl_kvext_bench.code import CUE, CodeWorkload


def test_each_edit_changes_one_line_near_the_end() -> None:
    work = CodeWorkload(functions=40, edits=5, tail_share=0.1)
    prompts = work.prompts()
    assert len(prompts) == 5 and all(p.endswith(CUE) for p in prompts)
    assert prompts == CodeWorkload(functions=40, edits=5, tail_share=0.1).prompts()  # seeded
    before = "\n".join(work.file_lines()) + CUE
    for old, new in zip([before, *prompts], prompts, strict=False):
        shared = len(os.path.commonprefix([old, new]))
        assert 0.85 * len(new) < shared < len(new)         # differs, and only in the tail
        changed = [a != b for a, b in zip(old.splitlines(), new.splitlines(), strict=True)]
        assert sum(changed) <= 1


@pytest.mark.bench
@pytest.mark.extended
def test_code_bench_tiny(tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "code.json"
    result = subprocess.run(
        [sys.executable, "-m", "sgl_kvext_bench.cli", "code", "--json", str(out),
         "--configs", "radix", "--functions", "12", "--edits", "3", "--answer-tokens", "4",
         "--model-path", str(model_path), "--server-args", "--max-total-tokens 6000"],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| configuration | cold TTFT (s) |" in result.stdout
    assert "'max_total_tokens': 6000" in (tmp_path / "code-radix.log").read_text()
    (radix,) = json.loads(out.read_text())["configs"]
    assert radix["name"] == "radix" and len(radix["edits"]) == 3
    assert radix["edits"][0]["cached_tokens"] < 0.2 * radix["edits"][0]["prompt_tokens"]
    for e in radix["edits"][1:]:                  # the file up to the edit is in the tree
        assert e["cached_tokens"] > 0.6 * e["prompt_tokens"], e


@pytest.mark.parametrize("flags, needle", [(["--edits", "0"], "--edits"),
                                           (["--server-args", "--foo 'bar"], "--server-args")])
def test_code_bench_rejects_bad_options(tmp_path: Path, flags: list[str], needle: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sgl_kvext_bench.cli", "code", "--json",
         str(tmp_path / "x.json"), *flags], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_url_that_does_not_answer_is_one_line(tmp_path: Path) -> None:
    from sgl_kvext.harness.server import free_port

    url = f"http://127.0.0.1:{free_port()}"            # nothing listens there
    result = subprocess.run(
        [sys.executable, "-m", "sgl_kvext_bench.cli", "code", "--json",
         str(tmp_path / "x.json"), "--url", url], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and f"--url {url}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.e2e
@pytest.mark.uses_server("serve")
def test_code_rag_and_multiturn_measure_a_running_server(tmp_path: Path,
                                                         servers: ServerPool) -> None:
    def bench(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sgl_kvext_bench.cli", *args,
                               "--answer-tokens", "4"], capture_output=True, text=True,
                              timeout=900)

    # Any running server will do: the pool's `sglang serve` one (a bounded KV pool: SGLang's
    # default takes most of the RAM, ~26 s to allocate here).
    server = servers.get("serve", SERVE_ARGS, launcher="serve")
    code = bench("code", "--json", str(tmp_path / "code.json"), "--url", server.url,
                 "--functions", "12", "--edits", "2")
    rag = bench("rag", "--json", str(tmp_path / "rag.json"), "--url", server.url,
                "--questions", "1", "--documents", "8", "--sentences", "4")
    # OpenAI-compatible /v1/completions, two users concurrently at a high arrival rate.
    chat = bench("multiturn", "--json", str(tmp_path / "mt.json"), "--url", server.url,
                 "--api", "openai", "--qps", "50", "--users", "2", "--turns", "2",
                 "--system-words", "30", "--question-words", "10")
    for run in (code, rag, chat):
        assert run.returncode == 0, run.stderr[-3000:]
    (url_code,) = json.loads((tmp_path / "code.json").read_text())["configs"]
    assert url_code["name"] == "url"
    assert url_code["edits"][1]["cached_tokens"] > 0.6 * url_code["edits"][1]["prompt_tokens"]
    assert len((tmp_path / "code.csv").read_text().splitlines()) == 1 + 2
    (url_rag,) = json.loads((tmp_path / "rag.json").read_text())["configs"]
    assert url_rag["name"] == "url" and len(url_rag["questions"]) == 1
    (url_chat,) = json.loads((tmp_path / "mt.json").read_text())["configs"]
    by = {(r["user"], r["turn"]): r for r in url_chat["requests"]}
    assert len(by) == 4 and all(r["completion_tokens"] == 4 for r in by.values())
    # Concurrent: user 2's first turn went out before user 1's first answer was complete.
    first = by[(0, 1)]
    assert by[(1, 1)]["sent_s"] < first["sent_s"] + first["ttft_s"] + sum(first["itl_s"])
    assert by[(0, 2)]["cached_tokens"] > 0.5 * by[(0, 2)]["prompt_tokens"]   # usage report
    assert "| url |" in chat.stdout and "host_hit" not in (tmp_path / "mt.json").read_text()
    assert not list(tmp_path.glob("code-*.log")) and not list(tmp_path.glob("rag-*.log"))
