"""The one module that reads and writes environment variables.

Every other module asks this one. Variables the project owns start with ``KVEXT_`` (not
``SGL_KVEXT_``: SGLang renames every ``SGL_*`` variable to ``SGLANG_*`` with a warning);
the few SGLang and Python variables it touches are named here too, so a reader can see at
a glance everything the process environment can change.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

PREFIX = "KVEXT_"

#: Path of a YAML config file (lowest-precedence source after the defaults).
CONFIG_FILE = PREFIX + "CONFIG"
#: The launcher's fully resolved config as JSON, inherited by SGLang's spawned scheduler.
RESOLVED_CONFIG = PREFIX + "RESOLVED_CONFIG"
#: Folder that holds prepared model checkpoints (default: ~/.cache/sgl_kvext).
CACHE_DIR = PREFIX + "CACHE_DIR"

#: The ASGI app the user's SGLang HTTP workers would import, wrapped by the plugin's own.
WRAPPED_HTTP_APP = PREFIX + "WRAPPED_HTTP_APP"
#: SGLang's: the ``module:attr`` of the ASGI app its HTTP workers import when
#: ``--tokenizer-worker-num > 1`` (they are fresh processes that load no plugins).
SGLANG_HTTP_APP = "SGLANG_HTTP_SERVER_APP_PATH"

_RESERVED = frozenset({CONFIG_FILE, RESOLVED_CONFIG, CACHE_DIR, WRAPPED_HTTP_APP})


def option_values(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``KVEXT_*`` option variables (reserved names excluded), keyed by full name."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if k.startswith(PREFIX) and k not in _RESERVED}


def get(name: str) -> str | None:
    """Value of one variable, or None when it is unset or empty."""
    value = os.environ.get(name, "")
    return value or None


def set_value(name: str, value: str) -> None:
    """Set a variable; child processes (SGLang's scheduler, detokenizer) inherit it."""
    os.environ[name] = value


def set_default(name: str, value: str) -> None:
    """Set a variable only when the user has not set it (or set it empty)."""
    if not os.environ.get(name):
        os.environ[name] = value


def prepend_pythonpath(folder: Path) -> None:
    """Put ``folder`` first on PYTHONPATH so subprocesses import from it first."""
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    entry = str(folder)
    if entry in parts:
        parts.remove(entry)
    os.environ["PYTHONPATH"] = os.pathsep.join([entry, *parts])


def cache_dir() -> Path:
    """Folder for prepared models and other cached artefacts."""
    configured = get(CACHE_DIR)
    if configured:
        return Path(configured).expanduser()
    xdg = get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sgl_kvext"
