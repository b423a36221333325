"""The demo on the real server: cold, radix-tree and host-tier rows, identical answers."""

import json
from pathlib import Path

import pytest

from sgl_kvext.harness.demo import run_demo
from sgl_kvext.harness.server import fast_cpu_dtype


@pytest.mark.e2e
def test_demo_brings_the_context_back_from_the_host_tier(model_path: Path,
                                                        tmp_path: Path) -> None:
    rows = run_demo(model_path, tmp_path, records=16, questions=2)
    assert [r.source for r in rows] == ["computed", "device", "host tier"]
    cold, device, host = rows
    assert cold.cached_tokens == 0
    assert device.cached_tokens > 0.8 * device.prompt_tokens
    assert host.cached_tokens > 0.8 * host.prompt_tokens     # the flush left it in the tier
    assert host.answer == cold.answer
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["same_answer_after_flush"] is True and len(saved["rows"]) == 3


def test_bf16_only_where_the_cpu_has_bf16_matrix_instructions(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n")
    assert fast_cpu_dtype(info) == "float32"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    assert fast_cpu_dtype(info) == "bfloat16"
    assert fast_cpu_dtype(tmp_path / "missing") == "float32"
