"""KVExtConfig: one frozen, validated configuration object for the server plugin and the CLIs.

Every option is declared once, as a dataclass field whose metadata holds its server flag,
help text and parser; the flag (``--kvext-host-size``), the environment variable
(``KVEXT_HOST_SIZE``) and the YAML key (``tiers: {host_size: ...}``) all derive from it.

Precedence, lowest first: defaults < YAML file < ``KVEXT_*`` variables < server flags
(or the ``overrides`` passed to :meth:`KVExtConfig.load`). Construction validates everything
and raises :class:`ConfigError` with a one-line message naming the option and what it allows.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sgl_kvext.config import env
from sgl_kvext.config.values import (
    GiB,
    MiB,
    check_key_file,
    check_s3_endpoint,
    check_s3_url,
    check_writable_dir,
    parse_bool,
    parse_choice,
    parse_float,
    parse_int,
    parse_optional_path,
    parse_optional_str,
    parse_size,
    parse_str,
)


class ConfigError(ValueError):
    """A configuration value is wrong; the message is one line naming the option."""


@dataclass(frozen=True, slots=True)
class Option:
    """How one config field is spelled and parsed outside Python."""

    flag: str
    help: str
    parse: Callable[[Any], Any]
    choices: tuple[str, ...] = ()

    @property
    def env_var(self) -> str:
        name = self.flag.removeprefix("--").removeprefix("kvext-")
        return env.PREFIX + name.replace("-", "_").upper()


def _opt(default: Any, flag: str, help: str, parse: Callable[[Any], Any] | None = None,
         choices: tuple[str, ...] = ()) -> Any:
    parse = parse_choice(choices) if choices else parse
    if parse is None:
        raise TypeError(f"option {flag} needs a parser or choices")
    return field(default=default, metadata={"option": Option(flag, help, parse, choices)})


def _describe(section: str, name: str, option: Option) -> str:
    key = f"{section}.{name}" if section else name
    return f"{option.flag} ({key}, {option.env_var})"


def _normalize(obj: Any, section: str) -> None:
    """Parse every field of a frozen section in place; raise ConfigError naming the option."""
    for f in dataclasses.fields(obj):
        option = f.metadata.get("option")
        if option is None:
            continue
        value = getattr(obj, f.name)
        try:
            parsed = option.parse(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{_describe(section, f.name, option)} = {value!r}: {exc}") from None
        object.__setattr__(obj, f.name, parsed)


def _fail(obj: Any, section: str, name: str, message: str) -> None:
    option = next(f for f in dataclasses.fields(obj) if f.name == name).metadata["option"]
    value = getattr(obj, name)
    shown = str(value) if isinstance(value, Path) else value
    raise ConfigError(f"{_describe(section, name, option)} = {shown!r}: {message}")


@dataclass(frozen=True, slots=True)
class TierConfig:
    """Where evicted KV spills: host memory, then a local disk folder, then S3."""

    page_tokens: int = _opt(32, "--kvext-page-tokens",
                            "Tokens per tier page (a multiple of SGLang's --page-size).",
                            parse_int)
    host_size: int = _opt(4 * GiB, "--kvext-host-size",
                          "Host-memory tier size, e.g. 4GiB (0 disables the tier).", parse_size)
    host_ratio: float = _opt(0.0, "--kvext-host-ratio",
                             "Host-memory tier size as a multiple of the device KV pool's bytes "
                             "(like SGLang's --hicache-ratio); above 0 it replaces "
                             "--kvext-host-size.", parse_float)
    disk_dir: Path | None = _opt(None, "--kvext-disk-dir",
                                 "Folder of the disk tier (unset disables it).",
                                 parse_optional_path)
    disk_size: int = _opt(16 * GiB, "--kvext-disk-size",
                          "Byte cap of the disk tier, shared by all processes using the folder.",
                          parse_size)
    s3_url: str | None = _opt(None, "--kvext-s3-url",
                              "S3 tier location s3://bucket[/prefix] (unset disables it).",
                              parse_optional_str)
    s3_endpoint: str | None = _opt(None, "--kvext-s3-endpoint",
                                   "S3 endpoint URL, e.g. http://127.0.0.1:8333 (unset: AWS).",
                                   parse_optional_str)
    s3_region: str = _opt("us-east-1", "--kvext-s3-region", "S3 region name.", parse_str)
    s3_timeout_s: float = _opt(5.0, "--kvext-s3-timeout",
                               "Seconds one S3 batch call may take; later answers are misses, "
                               "so a stalled S3 costs a request at most this.", parse_float)
    codec: str = _opt("zstd", "--kvext-codec", "Codec for KV written below host memory.",
                      choices=("none", "zstd"))
    eviction_policy: str = _opt("lru", "--kvext-eviction-policy", "Host-tier eviction policy.",
                                choices=("lru", "lfu", "s3fifo"))
    write_policy: str = _opt("write_through", "--kvext-write-policy",
                             "write_through copies cached prefixes down the tiers as they are "
                             "computed (shared with other instances at once); write_back only "
                             "when the tree evicts them.",
                             choices=("write_through", "write_back"))
    object_key_file: Path | None = _opt(None, "--kvext-object-key-file",
                                        "File holding this deployment's secret (>= 16 bytes, "
                                        "readable by its owner only): objects below host "
                                        "memory carry an AES-GMAC tag, and one without a "
                                        "valid tag is a miss (unset: xxh3 checksums).",
                                        parse_optional_path)
    encryption_key_file: Path | None = _opt(None, "--kvext-encryption-key-file",
                                            "File holding this deployment's secret (>= 16 "
                                            "bytes, readable by its owner only): objects "
                                            "below host memory are encrypted with "
                                            "AES-256-GCM, and one that fails to authenticate "
                                            "is a miss (unset: not encrypted). Not with "
                                            "--kvext-object-key-file.",
                                            parse_optional_path)
    prefetch_policy: str = _opt("timeout", "--kvext-prefetch-policy",
                                "How long a queued request waits for its pages to come up from "
                                "disk / S3: best_effort never waits, wait_complete waits (up to "
                                "30 s), timeout waits while loading beats recomputing.",
                                choices=("best_effort", "wait_complete", "timeout"))

    def __post_init__(self) -> None:
        _normalize(self, "tiers")
        if not 1 <= self.page_tokens <= 1 << 16:
            _fail(self, "tiers", "page_tokens", "must be in [1, 65536]")
        if not 0.0 <= self.host_ratio <= 100.0:
            _fail(self, "tiers", "host_ratio", "must be in [0, 100] (0: use host_size)")
        if self.disk_dir is not None:
            problem = check_writable_dir(self.disk_dir)
            if problem:
                _fail(self, "tiers", "disk_dir", problem)
        if self.s3_url is not None:
            problem = check_s3_url(self.s3_url)
            if problem:
                _fail(self, "tiers", "s3_url", problem)
        for name in ("object_key_file", "encryption_key_file"):
            path = getattr(self, name)
            problem = check_key_file(path) if path is not None else None
            if problem:
                _fail(self, "tiers", name, problem)
        if self.object_key_file is not None and self.encryption_key_file is not None:
            _fail(self, "tiers", "encryption_key_file", "cannot be set with object_key_file "
                  "(encrypted objects are authenticated already); allowed: one of the two")
        if not 0 < self.s3_timeout_s <= 600:
            _fail(self, "tiers", "s3_timeout_s", "must be in (0, 600] seconds")
        if self.s3_endpoint is not None:
            problem = check_s3_endpoint(self.s3_endpoint)
            if problem:
                _fail(self, "tiers", "s3_endpoint", problem)
            if self.s3_url is None:
                _fail(self, "tiers", "s3_endpoint", "needs --kvext-s3-url as well")


@dataclass(frozen=True, slots=True)
class FragmentConfig:
    """Non-prefix reuse of RAG chunks (fragment index)."""

    enabled: bool = _opt(False, "--kvext-fragment-blend",
                         "Reuse stored chunk KV at any prompt position (CacheBlend).", parse_bool)
    min_tokens: int = _opt(32, "--kvext-fragment-min-tokens",
                           "Smallest fragment, in tokens; automatic fragments average about "
                           "2.7x this.", parse_int)
    chunking: str = _opt("both", "--kvext-fragment-chunking",
                         "explicit: only request-marked chunks; auto: content-defined chunking; "
                         "both.", choices=("explicit", "auto", "both"))
    prewarm_queue: int = _opt(4096, "--kvext-prewarm-queue",
                              "Pre-warm fragments waiting for registration at most; a "
                              "/kvext/prewarm that would pass it gets HTTP 429.", parse_int)

    def __post_init__(self) -> None:
        _normalize(self, "fragments")
        if self.min_tokens < 1:
            _fail(self, "fragments", "min_tokens", "must be >= 1")
        if self.prewarm_queue < 1:
            _fail(self, "fragments", "prewarm_queue", "must be >= 1")


@dataclass(frozen=True, slots=True)
class BlendConfig:
    """CacheBlend selective recompute."""

    recompute_ratio: float = _opt(0.15, "--kvext-blend-recompute-ratio",
                                  "Share of fragment tokens recomputed, in [0, 1].", parse_float)
    check_layer: int = _opt(6, "--kvext-blend-check-layer",
                            "Layer whose K deviation selects the recomputed tokens (layers up "
                            "to it run over every token; 1 is CacheBlend's, faster, fewer "
                            "right answers).", parse_int)
    query_share: float = _opt(0.5, "--kvext-blend-query-share",
                              "Share of the recompute budget given to the reused tokens the "
                              "prompt's question attends to most, in [0, 1] (0: plain "
                              "CacheBlend).", parse_float)
    spread: str = _opt("prompt", "--kvext-blend-spread",
                       "How the rest of the budget is spread: one ranking over the prompt "
                       "(CacheBlend), per chunk by length, or per chunk by the attention "
                       "the question pays it.", choices=("prompt", "chunk", "attention"))
    fallback_entropy: float = _opt(3.0, "--kvext-blend-fallback-entropy",
                                   "Blended first-token entropy (nats) above which a prompt "
                                   "is computed exactly instead, a close call where the "
                                   "blend's error is largest (inf: never; lower: closer to "
                                   "exact, slower).", parse_float)

    def __post_init__(self) -> None:
        _normalize(self, "blend")
        if not 0.0 <= self.recompute_ratio <= 1.0:
            _fail(self, "blend", "recompute_ratio", "must be within [0, 1]")
        if self.check_layer < 0:
            _fail(self, "blend", "check_layer", "must be >= 0")
        if not 0.0 <= self.query_share <= 1.0:
            _fail(self, "blend", "query_share", "must be within [0, 1]")
        if math.isnan(self.fallback_entropy) or self.fallback_entropy < 0:
            _fail(self, "blend", "fallback_entropy", "must be >= 0 nats (inf: never)")


_SECTIONS: dict[str, type] = {"tiers": TierConfig, "fragments": FragmentConfig,
                              "blend": BlendConfig}


@dataclass(frozen=True, slots=True)
class KVExtConfig:
    """The whole sgl-kvext configuration; immutable and valid once constructed.

    Examples
    --------
    >>> KVExtConfig(enabled=True, tiers=TierConfig(host_size="1GiB")).tiers.host_size
    1073741824
    """

    enabled: bool = _opt(False, "--enable-hierarchical-kv",
                         "Use sgl-kvext's hierarchical radix cache (KV spills to host, disk, S3).",
                         parse_bool)
    max_request_bytes: int = _opt(16 * MiB, "--kvext-max-request-bytes",
                                  "Largest body of a generation request (/generate, "
                                  "/v1/completions, /v1/chat/completions); a larger one gets "
                                  "HTTP 413 unparsed.", parse_size)
    metrics_interval_s: float = _opt(1.0, "--kvext-metrics-interval",
                                     "Seconds between copies of sgl-kvext's counters onto "
                                     "/metrics (with --enable-metrics), in [0.05, 60].",
                                     parse_float)
    tiers: TierConfig = field(default_factory=TierConfig)
    fragments: FragmentConfig = field(default_factory=FragmentConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)

    def __post_init__(self) -> None:
        _normalize(self, "")
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"KVExtConfig.{name} must be a {cls.__name__}")
        if self.max_request_bytes < 1 * MiB:
            _fail(self, "", "max_request_bytes", "must be at least 1MiB")
        if not 0.05 <= self.metrics_interval_s <= 60:
            _fail(self, "", "metrics_interval_s", "must be within [0.05, 60] seconds")
        if self.fragments.enabled and not self.enabled:
            raise ConfigError("--kvext-fragment-blend needs --enable-hierarchical-kv")

    # ----------------------------------------------------------------- building
    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> KVExtConfig:
        """Build from dotted keys (``"tiers.host_size"``); unknown keys are an error."""
        known = {key for key, _ in options()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown option {unknown[0]!r}; known: {', '.join(sorted(known))}")
        sections = {name: sec(**{k.split(".", 1)[1]: v for k, v in values.items()
                                 if k.startswith(name + ".")})
                    for name, sec in _SECTIONS.items()}
        top = {k: v for k, v in values.items() if "." not in k}
        return cls(**top, **sections)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> KVExtConfig:
        """Build from the nested shape of :meth:`to_dict` and of the YAML file."""
        return cls.from_flat(_flatten(data))

    @classmethod
    def from_yaml(cls, path: str | Path) -> KVExtConfig:
        return cls.from_flat(_read_yaml(Path(path)))

    @classmethod
    def from_json(cls, text: str) -> KVExtConfig:
        return cls.from_mapping(json.loads(text))

    @classmethod
    def load(cls, config_file: str | Path | None = None,
             environ: Mapping[str, str] | None = None,
             overrides: Mapping[str, Any] | None = None) -> KVExtConfig:
        """Layer defaults < YAML < ``KVEXT_*`` variables < overrides, then validate.

        Parameters
        ----------
        config_file
            YAML file; when None, the ``KVEXT_CONFIG`` variable names one (if set).
        environ
            Variables to read instead of the process environment (for tests).
        overrides
            Dotted keys set explicitly, e.g. from server flags; None values are ignored.
        """
        if config_file is None:
            config_file = (environ or {}).get(env.CONFIG_FILE) if environ is not None \
                else env.get(env.CONFIG_FILE)
        values: dict[str, Any] = _read_yaml(Path(config_file)) if config_file else {}
        by_env = {opt.env_var: key for key, opt in options()}
        for var, raw in env.option_values(environ).items():
            if var not in by_env:
                raise ConfigError(f"unknown variable {var}; known: {', '.join(sorted(by_env))}")
            values[by_env[var]] = raw
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_flat(values)

    # --------------------------------------------------------------- exporting
    def to_dict(self) -> dict[str, Any]:
        """Nested plain-data form (paths as strings); ``from_mapping`` inverts it."""
        def plain(v: Any) -> Any:
            return str(v) if isinstance(v, Path) else v
        out: dict[str, Any] = {"enabled": self.enabled}
        for name in _SECTIONS:
            sec = getattr(self, name)
            out[name] = {f.name: plain(getattr(sec, f.name)) for f in dataclasses.fields(sec)}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def options() -> Iterator[tuple[str, Option]]:
    """Every option as (dotted key, Option), top-level first, in declaration order."""
    for f in dataclasses.fields(KVExtConfig):
        if "option" in f.metadata:
            yield f.name, f.metadata["option"]
    for name, sec in _SECTIONS.items():
        for f in dataclasses.fields(sec):
            yield f"{name}.{f.name}", f.metadata["option"]


def default_of(key: str) -> Any:
    """Default value of a dotted option key."""
    if "." not in key:
        return next(f.default for f in dataclasses.fields(KVExtConfig) if f.name == key)
    section, name = key.split(".", 1)
    return next(f.default for f in dataclasses.fields(_SECTIONS[section]) if f.name == name)


def _flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"config section {key!r} must be a mapping, got {value!r}")
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml  # local: only config files need it

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({str(exc).splitlines()[0]})") \
            from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path}: top level must be a mapping of options")
    return _flatten(data)
