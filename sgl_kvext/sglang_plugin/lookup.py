"""``POST /kvext/lookup``: how many leading tokens of a prompt each tier of this server holds.

For a router or an operator deciding where a prompt's KV is (docs/fleet.md). The body names
the prompt (``input_ids``, or ``text`` tokenized by the route off its event loop) and
optionally the tenant (``cache_salt``, ``extra_key``) and ``"remote": false`` (leave the
remote tiers out: they are the same for every server sharing them, and asking S3 is most of
a lookup's time); the answer::

    {"tokens": 1200, "page_tokens": 32, "device": 1187,
     "tiers": {"host": 1184, "disk": 1184, "s3": 1152}, "cached": 1187}

Each tier's figure is its leading run of whole pages from token 0 (the device's is token
exact); ``cached`` is what this server would serve without recomputing: the device prefix,
then the pages that follow it in any tier. Exact KV only (the blend namespace is not looked
at).

The scheduler answers the device match (read only: no access times, no node splits) and the
local tiers (host memory, disk: a dictionary and a ``stat`` per page), and hashes the pages;
remote tiers (S3) are asked by the route, in the HTTP process, on a worker thread, never on
the scheduler thread. A lookup creates no request and changes nothing cached.
"""

from __future__ import annotations

import asyncio
import dataclasses
from array import array
from typing import Any

from sgl_kvext.config.settings import KVExtConfig
from sgl_kvext.pages.keys import Tenant
from sgl_kvext.sglang_plugin.surface import RadixKey

METHOD = "kvext.lookup"
#: Longest prompt one lookup may name (hashing it on the scheduler takes ~10 ms).
MAX_TOKENS = 1 << 20


def _run(held: list[bool]) -> int:
    """Leading True values."""
    return next((i for i, h in enumerate(held) if not h), len(held))


def handle(tree: Any, body: dict[str, Any]) -> dict[str, Any]:
    """The scheduler's part; ValueError names bad input."""
    tiering = getattr(tree, "tiering", None)
    if tiering is None:
        raise ValueError("hierarchical KV is off: start the server with --enable-hierarchical-kv")
    ids = body.get("input_ids")
    if (not isinstance(ids, list) or not 1 <= len(ids) <= MAX_TOKENS
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 31
                       for t in ids)):
        raise ValueError(f"input_ids must be a list of 1..{MAX_TOKENS} token ids (or send text)")
    extra_key, cache_salt = body.get("extra_key", ""), body.get("cache_salt", "")
    if not isinstance(extra_key, str) or not isinstance(cache_salt, str):
        raise ValueError("extra_key and cache_salt must be strings")
    device = tree.device_prefix_len(RadixKey(array("q", ids), extra_key=extra_key or None,
                                             cache_salt=cache_salt or None))
    keys = tiering.keys_for(Tenant(extra_key, cache_salt), ids)
    tiers, held_local = {}, [False] * len(keys)
    remote = []
    for tier in tiering.chain.tiers:
        if not tier.capabilities.local:
            remote.append(tier.name)
            continue
        held = tier.exists(keys) if keys else []
        tiers[tier.name] = _run(held) * tiering.tokens
        held_local = [a or b for a, b in zip(held_local, held, strict=True)]
    return {"tokens": len(ids), "page_tokens": tiering.tokens, "device": device,
            "tiers": tiers, "held": "".join("1" if h else "0" for h in held_local),
            "remote": remote, "keys": [k.hex() for k in keys] if remote else [],
            "namespace": tiering.identity.digest().hex()}


class RemoteTiers:
    """The route's S3 tier, built once from the launcher's config for the namespace the
    scheduler reports (the HTTP process holds no tier otherwise)."""

    def __init__(self, config: KVExtConfig) -> None:
        self.config = config
        self._tiers: dict[str, list[Any]] = {}

    def exists(self, namespace_hex: str, keys: list[bytes]) -> dict[str, list[bool]]:
        from sgl_kvext.tiers.factory import build_tiers

        tiers = self._tiers.get(namespace_hex)
        if tiers is None:
            remote_only = dataclasses.replace(self.config.tiers, host_size=0, disk_dir=None)
            tiers = self._tiers[namespace_hex] = [
                t for t in build_tiers(remote_only, bytes.fromhex(namespace_hex))
                if not t.capabilities.local]
        return {t.name: t.exists(keys) for t in tiers}


async def answer(scheduler_part: dict[str, Any], remote: RemoteTiers | None) -> dict[str, Any]:
    """The route's answer from the scheduler's part, remote tiers asked off the event loop."""
    page, keys = scheduler_part["page_tokens"], scheduler_part["keys"]
    held = [c == "1" for c in scheduler_part["held"]]
    tiers = dict(scheduler_part["tiers"])
    if keys and remote is not None:
        raw = [bytes.fromhex(k) for k in keys]
        found = await asyncio.to_thread(remote.exists, scheduler_part["namespace"], raw)
        for name, flags in found.items():
            tiers[name] = _run(flags) * page
            held = [a or b for a, b in zip(held, flags, strict=True)]
    device = scheduler_part["device"]
    first = device // page
    end = first + _run(held[first:])
    return {"tokens": scheduler_part["tokens"], "page_tokens": page, "device": device,
            "tiers": tiers, "cached": min(scheduler_part["tokens"], max(device, end * page))}
