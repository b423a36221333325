"""The model identity that seeds every page key, read off SGLang's build context.

Two servers share cached KV only if everything that shapes the KV bytes is equal: the model
config, the weights, the KV dtype, the tier page size, the KV geometry, the tensor-parallel
shard, the quantization and the object format. Weights are identified without reading whole
checkpoints (minutes for large ones): per weight file, its name and size, its first and last
MiB (a safetensors header, tensor names, dtypes, shapes and offsets, sits in the first) and
64 KiB at each of 32 evenly spaced offsets (a fine-tune changes every tensor). A hub id is
resolved to the snapshot SGLang downloaded (its commit); only when none is cached is it
identified by name and revision.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sgl_kvext.pages.keys import ModelIdentity
from sgl_kvext.tiers.objects import VERSION

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_EDGE = 1 << 20
_SAMPLES, _SAMPLE = 32, 64 << 10


def _snapshot(model_id: str, revision: str | None) -> Path | None:
    """The cached hub snapshot of ``model_id`` (its folder name is the commit), or None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, revision=revision, local_files_only=True))
    except Exception:   # not a hub id, nothing cached, or no huggingface_hub
        return None


def weights_digest(model_path: str, revision: str | None = None) -> str:
    """Cheap identity of a checkpoint folder (or of a hub id and revision)."""
    folder = Path(model_path)
    h = hashlib.sha256()
    if not folder.is_dir():
        snapshot = _snapshot(model_path, revision)
        if snapshot is None:
            h.update(f"{model_path}@{revision or 'main'}".encode())
            return h.hexdigest()
        folder = snapshot
        h.update(f"{model_path}@{snapshot.name}".encode())
    for file in sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES):
        size = file.stat().st_size
        h.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            for offset in (0, max(size - _EDGE, 0)):
                f.seek(offset)
                h.update(f.read(_EDGE))
            for i in range(_SAMPLES):
                f.seek(size * i // _SAMPLES)
                h.update(f.read(_SAMPLE))
    return h.hexdigest()


def config_digest(hf_config: Any) -> str:
    try:
        text = hf_config.to_json_string(use_diff=False)
    except (AttributeError, TypeError):
        text = json.dumps(str(hf_config))
    return hashlib.sha256(text.encode()).hexdigest()


def model_identity(model_config: Any, kv_dtype: str, page_tokens: int, layers: int,
                   kv_heads: int, head_dim: int, tp_rank: int, tp_size: int,
                   quantization: str | None = None, pp_rank: int = 0,
                   pp_size: int = 1) -> ModelIdentity:
    """:class:`ModelIdentity` of the served model (``model_config``: SGLang's ModelConfig)."""
    return ModelIdentity(
        config=config_digest(getattr(model_config, "hf_config", model_config)),
        weights=weights_digest(str(model_config.model_path),
                               getattr(model_config, "revision", None)),
        dtype=kv_dtype, page_size=page_tokens,
        kv_layout=f"mha:layers={layers},kv_heads={kv_heads},head_dim={head_dim}",
        tp_rank=tp_rank, tp_size=tp_size, quantization=quantization or "",
        pp_rank=pp_rank, pp_size=pp_size,
        object_format=VERSION)
