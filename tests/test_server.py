"""The real SGLang server on this machine's CPU with SmolLM2: flags, errors, exact outputs.

Exactness runs in float32 (server ``--dtype float32``, transformers in float32): in bfloat16
the two stacks round differently and greedy paths part after a few dozen tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from server_pool import SERVE_ARGS, ServerPool

from sgl_kvext.harness.seaweedfs import SeaweedFS
from sgl_kvext.harness.server import LAUNCHERS, SGLangServer, device_flags

pytestmark = pytest.mark.e2e

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a small village,", "List three primary colors:"]
MAX_NEW = 24
# A shared ~300-token context, then two different questions: the second request must reuse it.
CONTEXT = "".join(f"Note {i}: the {w} lamp in room {i * 7 % 31} was checked on day {i % 28}.\n"
                  for i, w in enumerate(["red", "blue", "green", "amber", "white"] * 4))
QUESTIONS = ["Which lamp was checked in room 14?", "On which day was the amber lamp checked?"]


def _launch(launcher: str, model_path: Path, *args: str, timeout: float = 180,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [*LAUNCHERS[launcher], "--model-path", str(model_path), "--host", "127.0.0.1",
           "--port", "1", *device_flags(), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


def test_launch_server_help_lists_the_flags() -> None:
    result = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--enable-hierarchical-kv", "--kvext-host-size", "--kvext-disk-dir",
                 "--kvext-s3-url", "--kvext-eviction-policy", "--kvext-config"):
        assert flag in result.stdout
    assert ",kvext_cpu" in result.stdout      # the plugin's attention backend


#: Bad settings and the text their one-line error must hold.
BAD_SETTINGS = [
    (["--enable-hierarchical-kv", "--kvext-eviction-policy", "mru"], "lru, lfu, s3fifo"),
    (["--enable-hierarchical-kv", "--kvext-host-size=-1GiB"], "--kvext-host-size"),
    (["--enable-hierarchical-kv", "--kvext-s3-url", "https://bucket"], "s3://bucket"),
    (["--enable-hierarchical-kv", "--disable-radix-cache"], "--disable-radix-cache"),
    (["--enable-hierarchical-kv", "--pp-size", "2"], "--pp-size > 1"),
    (["--kvext-fragment-blend"], "needs --enable-hierarchical-kv"),
    (["--enable-hierarchical-kv", "--kvext-disk-dir", "/proc/kvext-no"], "not writable"),
    (["--enable-hierarchical-kv", "--kvext-s3-url", "s3://kvext-bucket", "--kvext-s3-timeout",
      "0"], "(0, 600]"),
    (["--enable-hierarchical-kv", "--kvext-no-such-option", "1"], "unrecognized arguments"),
]

# SGLang's own argument parsing with the plugin loaded, as both launchers run it, once per
# case in one process (a launcher process per case costs ~12 s of imports each).
PARSE = r"""
import contextlib, io, json, os, sys
from sglang.srt.plugins import load_plugins
from sglang.srt.server_args import prepare_server_args
load_plugins()
out = []
for argv, env in json.loads(sys.argv[1]):
    os.environ.update(env)
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            prepare_server_args(argv)
        except SystemExit as exc:
            code = exc.code
    out.append([code, err.getvalue()])
print("RESULT " + json.dumps(out))
"""


def _parse_all(model_path: Path, cases: list[tuple[list[str], dict[str, str]]]
               ) -> list[tuple[int, str]]:
    argvs = [[["--model-path", str(model_path), *device_flags(), *args], env]
             for args, env in cases]
    proc = subprocess.run([sys.executable, "-c", PARSE, json.dumps(argvs)],
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return [(int(c), e) for c, e in json.loads(lines[-1][len("RESULT "):])]


def _one_error(stderr: str, start: str = "") -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line and line.startswith(start)]


def test_bad_settings_fail_at_start_with_one_line(model_path: Path, seaweed: SeaweedFS) -> None:
    refused = ["--enable-hierarchical-kv", "--kvext-s3-url", f"s3://kvext-e2e/{uuid.uuid4().hex}",
               "--kvext-s3-endpoint", seaweed.endpoint]
    wrong = {"AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong-too"}
    cases = [(args, {}) for args, _ in BAD_SETTINGS] + [(refused, wrong)]
    needles = [n for _, n in BAD_SETTINGS] + ["refused this process's credentials"]
    for (code, stderr), needle in zip(_parse_all(model_path, cases), needles, strict=True):
        errors = _one_error(stderr)
        assert code == 2 and len(errors) == 1 and needle in errors[0], (needle, stderr[-2000:])


def test_a_real_launch_with_a_bad_setting_exits_2_with_one_line(model_path: Path) -> None:
    # The parser hooks above, through the recommended entry point's real process.
    result = _launch("serve", model_path, "--enable-hierarchical-kv", "--kvext-host-size=-1GiB")
    assert result.returncode == 2
    errors = _one_error(result.stderr)
    assert len(errors) == 1 and "--kvext-host-size" in errors[0], result.stderr[-2000:]


def _check_exact(server: SGLangServer, hf_greedy: Callable[[Sequence[str], int], list[list[int]]],
                 ) -> None:
    expected = hf_greedy(PROMPTS, MAX_NEW)
    for prompt, want in zip(PROMPTS, expected, strict=True):
        got = server.generate(prompt, max_new_tokens=MAX_NEW)
        assert got.output_ids == want, f"{prompt!r}: {got.text!r}"
    prompts = [CONTEXT + q for q in QUESTIONS]
    expected = hf_greedy(prompts, MAX_NEW)
    first = server.generate(prompts[0], max_new_tokens=MAX_NEW)
    second = server.generate(prompts[1], max_new_tokens=MAX_NEW)
    assert first.output_ids == expected[0]
    assert second.output_ids == expected[1]
    assert second.cached_tokens >= 250, second   # the shared context came from the tree
    # All at once: batches that mix cold prefills, cached prefixes and decodes of different
    # lengths. In float32 a request's greedy tokens do not depend on its batch-mates.
    together = [*PROMPTS, *prompts, CONTEXT + "Which lamp was checked on day 3?"]
    expected = hf_greedy(together, MAX_NEW)
    with ThreadPoolExecutor(len(together)) as pool:
        got = list(pool.map(lambda p: server.generate(p, max_new_tokens=MAX_NEW), together))
    assert [g.output_ids for g in got] == expected


@pytest.mark.parametrize("launcher, flags, tree", [
    pytest.param("launch_server", ["--attention-backend", "torch_native"], "UnifiedRadixCache",
                 marks=pytest.mark.extended),
    pytest.param("launch_server", ["--chunked-prefill-size", "64"], "UnifiedRadixCache",
                 marks=pytest.mark.extended),
    pytest.param("serve", None, "HierarchicalRadixCache",
                 marks=pytest.mark.uses_server("serve")),
])
def test_greedy_output_equals_transformers(launcher: str, flags: list[str] | None, tree: str,
                                           model_path: Path, log_dir: Path,
                                           servers: ServerPool,
                                           hf_greedy: Callable[..., list[list[int]]]) -> None:
    if flags is None:       # the pool's `sglang serve` server (SERVE_ARGS)
        server = servers.get("serve", SERVE_ARGS, launcher=launcher)
        _check_exact(server, hf_greedy)
        log = server.log_path.read_text()
    else:
        args = ["--dtype", "float32", "--max-total-tokens", "16384", *flags]
        with SGLangServer(model_path, args, log_path=log_dir / "server.log",
                          launcher=launcher) as server:
            _check_exact(server, hf_greedy)
            log = server.log_path.read_text()
    assert f"impl={tree}" in log
    assert ("sgl-kvext: HierarchicalRadixCache active" in log) == (tree != "UnifiedRadixCache")
