"""The embedded SmolLM2 checkpoint: verified, idempotent, repaired when tampered with."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from sgl_kvext.harness.model_prep import (
    EXPECTED_CONFIG,
    ModelPrepError,
    default_model_dir,
    prepare_smollm2,
    verify_checkpoint,
)


def test_prepared_checkpoint_is_verified(model_path: Path) -> None:
    assert verify_checkpoint(model_path) is None
    config = json.loads((model_path / "config.json").read_text())
    assert config["num_hidden_layers"] == EXPECTED_CONFIG["num_hidden_layers"]
    assert config["dtype"] == "bfloat16"
    assert (model_path / "tokenizer.json").is_file()


def test_prepare_twice_reuses(model_path: Path) -> None:
    again = prepare_smollm2()
    assert again.reused and again.path == model_path


def _linked_cache(src_model: Path, cache: Path) -> Path:
    """A cache folder whose big files are hard links to the prepared ones (no copying)."""
    dest = default_model_dir(cache_dir=cache)
    dest.mkdir(parents=True)
    for f in src_model.iterdir():
        (os.link if f.stat().st_size > 1 << 20 else shutil.copy2)(f, dest / f.name)
    downloads = cache / "downloads"
    downloads.mkdir()
    gguf = src_model.parent.parent / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if gguf.is_file():
        os.link(gguf, downloads / gguf.name)
    return dest


@pytest.mark.e2e
def test_tampering_is_detected_and_repaired(model_path: Path, tmp_path: Path) -> None:
    dest = _linked_cache(model_path, tmp_path)
    assert verify_checkpoint(dest) is None
    config = json.loads((dest / "config.json").read_text())
    config["num_hidden_layers"] = 29
    (dest / "config.json").write_text(json.dumps(config))
    assert "config.json does not match" in str(verify_checkpoint(dest))
    rebuilt = prepare_smollm2(cache_dir=tmp_path)
    assert not rebuilt.reused and verify_checkpoint(rebuilt.path) is None
    assert json.loads((rebuilt.path / "config.json").read_text())["num_hidden_layers"] == 30
    assert verify_checkpoint(model_path) is None   # the shared files were not touched


def test_missing_file_is_detected(model_path: Path, tmp_path: Path) -> None:
    dest = _linked_cache(model_path, tmp_path)
    (dest / "tokenizer.json").unlink()
    assert "tokenizer.json is missing" in str(verify_checkpoint(dest))
    assert "manifest.json is missing" in str(verify_checkpoint(tmp_path))


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(ModelPrepError, match="allowed: bfloat16, float16, float32"):
        prepare_smollm2("int4")
