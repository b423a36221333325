"""The model identity that seeds every page key, read off SGLang's build context.

Two servers share cached KV only if everything that shapes the KV bytes is equal: the model
config, the weights, the KV dtype, the tier page size, the KV geometry and the tensor-parallel
shard. Weights are identified cheaply: per weight file, its name, size and hashes of its first
and last MiB (a fine-tune changes them; hashing whole checkpoints would take minutes).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sgl_kvext.pages.keys import ModelIdentity

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_EDGE = 1 << 20


def weights_digest(model_path: str, revision: str | None = None) -> str:
    """Cheap identity of a checkpoint folder (or of a hub id and revision)."""
    folder = Path(model_path)
    h = hashlib.sha256()
    if not folder.is_dir():
        h.update(f"{model_path}@{revision or 'main'}".encode())
        return h.hexdigest()
    for file in sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES):
        size = file.stat().st_size
        h.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            h.update(f.read(_EDGE))
            f.seek(max(size - _EDGE, 0))
            h.update(f.read(_EDGE))
    return h.hexdigest()


def config_digest(hf_config: Any) -> str:
    try:
        text = hf_config.to_json_string(use_diff=False)
    except (AttributeError, TypeError):
        text = json.dumps(str(hf_config))
    return hashlib.sha256(text.encode()).hexdigest()


def model_identity(model_config: Any, kv_dtype: str, page_tokens: int, layers: int,
                   kv_heads: int, head_dim: int, tp_rank: int, tp_size: int) -> ModelIdentity:
    """:class:`ModelIdentity` of the served model (``model_config``: SGLang's ModelConfig)."""
    return ModelIdentity(
        config=config_digest(getattr(model_config, "hf_config", model_config)),
        weights=weights_digest(str(model_config.model_path),
                               getattr(model_config, "revision", None)),
        dtype=kv_dtype, page_size=page_tokens,
        kv_layout=f"mha:layers={layers},kv_heads={kv_heads},head_dim={head_dim}",
        tp_rank=tp_rank, tp_size=tp_size)
