"""The sgl-kvext config inside the processes SGLang spawns (scheduler, tokenizer manager)."""

from __future__ import annotations

import dataclasses
import functools

from sgl_kvext.config import env
from sgl_kvext.config.settings import KVExtConfig


def process_config() -> KVExtConfig | None:
    """The launcher's resolved config in a process SGLang spawned, else None (launcher)."""
    resolved = env.get(env.RESOLVED_CONFIG)
    return _parsed(resolved) if resolved else None


@functools.lru_cache(maxsize=4)
def _parsed(resolved: str) -> KVExtConfig:
    # Parsed once: validating it probes the disk folder with a file (a write on every
    # request when the scheduler asked per request).
    return KVExtConfig.from_json(resolved)


def scheduler_config() -> KVExtConfig:
    """The config the launcher resolved (inherited JSON), else one read from YAML / variables.

    The backend was selected explicitly when this runs, so the result is always enabled.
    """
    config = process_config() or KVExtConfig.load()
    return config if config.enabled else dataclasses.replace(config, enabled=True)
