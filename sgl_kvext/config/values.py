"""Parsers and checks for config values; each raises ValueError with a short reason.

Parsers accept the already-typed value too (``parse_size(4096) == 4096``), so a config
built in Python and one read from flags, variables or YAML go through the same path.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_UNITS = {"": 1, "b": 1, "k": KiB, "kib": KiB, "kb": 1000, "m": MiB, "mib": MiB, "mb": 10**6,
          "g": GiB, "gib": GiB, "gb": 10**9, "t": TiB, "tib": TiB, "tb": 10**12}
_SIZE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as ``4GiB``, ``512MB``, ``1.5G`` (K/M/G/T are binary)."""
    if isinstance(value, bool):
        raise ValueError("must be a size such as 4GiB or 512MiB, not a boolean")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        unit = match.group(2).lower() if match else ""
        if not match or unit not in _UNITS:
            raise ValueError("must be a size such as 4GiB, 512MiB or 1000000 (bytes)")
        size = int(float(match.group(1)) * _UNITS[unit])
    if size < 0:
        raise ValueError("must be a size >= 0 bytes")
    return size


def format_size(size: int) -> str:
    """Shortest exact binary-unit spelling of a byte count: 4GiB, 1536MiB, 1000."""
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("must be a boolean: true/false, 1/0, yes/no, on/off")


def parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("must be an integer, not a boolean")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError("must be an integer") from None


def parse_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError("must be a number") from None


def parse_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def parse_optional_str(value: Any) -> str | None:
    return None if value is None or value == "" else parse_str(value)


def parse_optional_path(value: Any) -> Path | None:
    if value is None or value == "":
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError("must be a path")
    return Path(value).expanduser()


def parse_choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower() if isinstance(value, str) else value
        if text not in choices:
            raise ValueError(f"allowed values are {', '.join(choices)}")
        return str(text)
    return parse


def check_writable_dir(path: Path) -> str | None:
    """Why ``path`` cannot serve as a cache folder, or None when it can (nothing is left behind)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return "no existing parent folder"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    mode = probe.stat().st_mode
    if probe == path and mode & 0o022:     # others could plant objects (or read new ones)
        return (f"{path} is writable by group or others (mode {oct(mode & 0o777)}); allowed: "
                "a folder only its owner can write (chmod go-w)")
    try:  # a real write: os.access says yes to root even on read-only file systems
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        return f"{probe} is not writable ({exc.strerror})"
    return None


def check_key_file(path: Path) -> str | None:
    """Why ``path`` cannot hold an object key, or None when it can."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > 4096:
            return "must be a regular file of at most 4096 bytes"
        size = len(path.read_bytes().strip())
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if st.st_mode & 0o077:
        return (f"is readable or writable by group or others (mode {oct(st.st_mode & 0o777)}); "
                "allowed: its owner only (chmod 600)")
    if size < 16:
        return f"holds {size} bytes; allowed: at least 16 (e.g. head -c 32 /dev/urandom)"
    return None


def check_s3_url(url: str) -> str | None:
    """Why ``url`` is not of the form ``s3://bucket[/prefix]``, or None."""
    parts = urlsplit(url)
    if parts.scheme != "s3":
        return "must look like s3://bucket[/prefix]"
    if not _BUCKET.match(parts.netloc) or ".." in parts.netloc:
        return "bucket must be 3-63 characters of a-z, 0-9, '.', '-' (s3://bucket[/prefix])"
    if parts.query or parts.fragment:
        return "must not carry a query or fragment (s3://bucket[/prefix])"
    return None


def check_s3_endpoint(url: str) -> str | None:
    """Why ``url`` is not an http(s)://host[:port] endpoint, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must look like http://host:port or https://host"
    try:
        _ = parts.port  # raises on a port out of range or not a number
    except ValueError:
        return "has an invalid port"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "must be only scheme, host and port (http://host:port)"
    return None
