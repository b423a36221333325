"""The sgl-kvext command: config errors are one line, model path reports its state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "sgl_kvext.harness.cli", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_config_show_resolves_sources(tmp_path: Path) -> None:
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("tiers: {host_size: 1GiB}\n")
    result = _cli("config", "--config", str(yaml_file), env={"KVEXT_CODEC": "none"})
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["tiers"]["host_size"] == 1 << 30 and shown["tiers"]["codec"] == "none"


def test_bad_config_is_one_line_exit_2() -> None:
    result = _cli("config", env={"KVEXT_EVICTION_POLICY": "mru"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "--kvext-eviction-policy" in lines[0] and "lru, lfu, s3fifo" in lines[0]


def test_model_path_of_unprepared_cache(tmp_path: Path) -> None:
    result = _cli("model", "path", "--cache-dir", str(tmp_path))
    assert result.returncode == 1 and "sgl-kvext model prepare" in result.stderr


def test_model_path_of_prepared_cache(model_path: Path) -> None:
    result = _cli("model", "path")
    assert result.returncode == 0 and result.stdout.strip() == str(model_path)
