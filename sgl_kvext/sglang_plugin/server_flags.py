"""sgl-kvext's server flags on ``python -m sglang.launch_server`` and ``sglang serve``.

SGLang has no API for adding flags, so two AROUND hooks wrap ``ServerArgs``:

- ``add_cli_args`` adds an "sgl-kvext" argument group generated from
  :mod:`sgl_kvext.config.settings`;
- ``from_cli_args`` builds and validates :class:`KVExtConfig` from those flags (over YAML and
  ``KVEXT_*`` variables), exits with a one-line error when it is invalid (or when the S3
  server refuses the credentials: one HEAD of the bucket), selects the
  ``kvext`` radix-cache backend when ``--enable-hierarchical-kv`` is on, and exports the
  resolved config as JSON in the environment, which SGLang's spawned scheduler inherits
  (``ServerArgs`` itself only carries its own dataclass fields); it also turns graph capture
  off for ``--attention-backend kvext_cpu``, as SGLang does for ``torch_native``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sgl_kvext.config import env
from sgl_kvext.config.settings import ConfigError, KVExtConfig, default_of, options
from sgl_kvext.config.values import format_size, parse_bool, parse_size
from sgl_kvext.sglang_plugin import BACKEND_NAME
from sgl_kvext.sglang_plugin.surface import (
    HOOK_ADD_CLI_ARGS,
    HOOK_FROM_CLI_ARGS,
    HookRegistry,
    HookType,
)

_DEST_PREFIX = "kvext__"
_CONFIG_FILE_DEST = _DEST_PREFIX + "config_file"
#: SGLang options that pick another cache and so cannot be combined with ours.
_CONFLICTS = {
    "enable_hierarchical_cache": "--enable-hierarchical-cache (SGLang's HiCache)",
    "disable_radix_cache": "--disable-radix-cache",
    "enable_lmcache": "--enable-lmcache",
    "enable_flexkv": "--enable-flexkv",
}

_registered = False


def register_hooks() -> None:
    """Register both hooks once per process (SGLang applies them after plugins load)."""
    global _registered
    if _registered:
        return
    HookRegistry.register(HOOK_ADD_CLI_ARGS, _add_cli_args, HookType.AROUND)
    HookRegistry.register(HOOK_FROM_CLI_ARGS, _from_cli_args, HookType.AROUND)
    _registered = True


def _dest(key: str) -> str:
    return _DEST_PREFIX + key.replace(".", "__")


def _add_cli_args(original: Any, parser: argparse.ArgumentParser) -> None:
    original(parser)
    group = parser.add_argument_group("sgl-kvext (hierarchical KV cache)")
    group.add_argument("--kvext-config", dest=_CONFIG_FILE_DEST, default=None, metavar="YAML",
                       help="YAML file of sgl-kvext options (see docs/configuration.md); "
                            "KVEXT_* variables and these flags override it.")
    for key, option in options():
        if option.parse is parse_bool:
            group.add_argument(option.flag, dest=_dest(key), action="store_const", const=True,
                               default=None, help=option.help)
            continue
        metavar = "{" + ",".join(option.choices) + "}" if option.choices else "VALUE"
        default = default_of(key)
        shown = "unset" if default is None else (
            format_size(default) if option.parse is parse_size else default)
        group.add_argument(option.flag, dest=_dest(key), default=None, metavar=metavar,
                           help=f"{option.help} Default: {shown}.")


def _from_cli_args(original: Any, cls: type, args: argparse.Namespace) -> Any:
    overrides = {key: getattr(args, _dest(key), None) for key, _ in options()}
    try:
        config = KVExtConfig.load(config_file=getattr(args, _CONFIG_FILE_DEST, None),
                                  overrides=overrides)
        if config.enabled:
            _check_compatible(args)
            _check_s3_access(config)
    except ConfigError as exc:
        sys.stderr.write(f"sgl-kvext: error: {exc}\n")
        raise SystemExit(2) from None
    if config.enabled:
        args.radix_cache_backend = BACKEND_NAME
        from sgl_kvext.sglang_plugin import prewarm

        prewarm.add_routes(config)
        if (getattr(args, "tokenizer_worker_num", 1) or 1) > 1:
            prewarm.route_http_workers()
    from sgl_kvext.sglang_plugin import cpu_attention

    cpu_attention.disable_graphs_for(args)
    env.set_value(env.RESOLVED_CONFIG, config.to_json())
    return original(cls, args)


def _check_s3_access(config: KVExtConfig) -> None:
    """Refuse to start with S3 credentials the S3 server rejects (one HEAD of the bucket)."""
    tiers = config.tiers
    if tiers.s3_url is None:
        return
    from sgl_kvext.tiers.s3 import refused_access

    problem = refused_access(tiers.s3_url, endpoint=tiers.s3_endpoint, region=tiers.s3_region,
                             timeout_s=tiers.s3_timeout_s)
    if problem:
        raise ConfigError(f"--kvext-s3-url {tiers.s3_url}: {problem}")


def _check_compatible(args: argparse.Namespace) -> None:
    for attr, flag in _CONFLICTS.items():
        if getattr(args, attr, False):
            raise ConfigError(f"--enable-hierarchical-kv cannot be combined with {flag}")
    if (getattr(args, "pp_size", 1) or 1) > 1:
        raise ConfigError("--enable-hierarchical-kv does not support --pp-size > 1 yet "
                          "(pipeline stages do not agree on admissions; allowed: 1)")
    backend = getattr(args, "radix_cache_backend", None)
    if backend not in (None, BACKEND_NAME):
        raise ConfigError(f"--enable-hierarchical-kv selects --radix-cache-backend {BACKEND_NAME}, "
                          f"but {backend!r} was given")
