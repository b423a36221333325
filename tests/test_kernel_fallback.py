"""The sgl_kernel fallback: installed only where the real package cannot load, and reaching
the processes SGLang spawns (which import sgl_kernel before loading plugins)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run_python

from sgl_kvext.sglang_plugin.kernel_fallback import SHIM_DIR

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="on a CUDA machine the real sgl_kernel is used")

PROBE = """
import json, multiprocessing as mp, os, sys
from sgl_kvext.sglang_plugin.kernel_fallback import ensure_sgl_kernel

def child_sees_fallback(q):
    import sgl_kernel
    q.put(bool(getattr(sgl_kernel, "KVEXT_FALLBACK", False)))

if __name__ == "__main__":
    before = list(sys.path)
    status = ensure_sgl_kernel()
    again = ensure_sgl_kernel()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=child_sees_fallback, args=(q,))
    p.start(); spawned = q.get(timeout=120); p.join(timeout=60)
    print(json.dumps({"source": status.source.value, "reason": status.reason,
                      "again": again.source.value, "path0": sys.path[0],
                      "pythonpath0": os.environ["PYTHONPATH"].split(os.pathsep)[0],
                      "cpu_engine": os.environ.get("SGLANG_USE_CPU_ENGINE"),
                      "spawned": spawned}))
"""


def _run_probe(tmp_path: Path, env: dict[str, str]) -> dict[str, object]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    result = run_python(f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')",
                        env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_fallback_installed_when_real_sgl_kernel_cannot_load(tmp_path: Path) -> None:
    out = _run_probe(tmp_path, {"PYTHONPATH": "", "SGLANG_USE_CPU_ENGINE": ""})
    assert out["source"] == "fallback"
    assert "libcuda" in str(out["reason"]) or "common_ops" in str(out["reason"])
    assert out["again"] == "fallback"
    assert out["path0"] == out["pythonpath0"] == str(SHIM_DIR)
    assert out["cpu_engine"] == "1"
    assert out["spawned"] is True   # a spawned process imports the shim, like SGLang's scheduler


def test_user_setting_of_cpu_engine_is_kept(tmp_path: Path) -> None:
    out = _run_probe(tmp_path, {"SGLANG_USE_CPU_ENGINE": "0"})
    assert out["source"] == "fallback" and out["cpu_engine"] == "0"


def test_a_working_sgl_kernel_is_never_shadowed(tmp_path: Path) -> None:
    """A fake sgl_kernel that imports fine stands in for a working build (none exists here)."""
    fake = tmp_path / "fake_working_sgl_kernel" / "sgl_kernel"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("WORKING = True\n")
    code = """
import json, os, sys
from sgl_kvext.sglang_plugin.kernel_fallback import ensure_sgl_kernel
status = ensure_sgl_kernel()
import sgl_kernel
print(json.dumps([status.source.value, getattr(sgl_kernel, "WORKING", False),
                  os.environ.get("SGLANG_USE_CPU_ENGINE"), os.environ.get("PYTHONPATH")]))
"""
    result = run_python(code, env={"PYTHONPATH": str(fake.parent), "SGLANG_USE_CPU_ENGINE": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    source, working, cpu_engine, pythonpath = json.loads(result.stdout.strip().splitlines()[-1])
    assert (source, working, cpu_engine, pythonpath) == ("real", True, "", str(fake.parent))
