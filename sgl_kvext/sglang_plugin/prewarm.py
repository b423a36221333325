"""The ``/kvext`` routes: corpus pre-warming (``POST /kvext/prewarm``, ``POST
/kvext/fragments``, with ``--kvext-fragment-blend``), ``POST /kvext/lookup`` (with the
tiers on: :mod:`.lookup`) and ``POST /kvext/scheduler`` (the scheduler's longest gap between
forwards: :mod:`.scheduler_gaps`).

The routes are added to SGLang's FastAPI app in the launcher process. They reach the
scheduler through SGLang's generic control message (``DumperControlReqInput`` with a
``kvext.`` method; an AROUND hook on ``Scheduler.handle_dumper_control`` answers those and
passes every other method on), so no new message type is needed.

- ``kvext.prewarm``: the route tokenizes the texts (in the tokenizer manager's process, off
  its event loop); the scheduler queues each text's core and its automatic fragments for
  registration in the request namespace that may receive blended KV and answers at once with
  the fragment keys; registration runs on the blender's worker thread, never on the
  scheduler's.

Bounds, so no client can stall or exhaust the scheduler: a body of at most
:data:`MAX_BODY_BYTES` (HTTP 413), at most :data:`MAX_TEXTS` texts and
:data:`MAX_PREWARM_TOKENS` tokens per request, each text at most the model's context (HTTP
400: the scheduler's share of one request stays around 10 ms), and a bounded registration
queue (HTTP 429 with ``Retry-After`` while it is full; ``prewarm_corpus`` sends a corpus in
parts and waits).
- ``kvext.fragments`` answers which of the given keys are registered (stored and written
  through the tier chain).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import Request  # module level: FastAPI resolves the string annotations here
from fastapi.responses import ORJSONResponse

from sgl_kvext.config import env
from sgl_kvext.config.settings import KVExtConfig
from sgl_kvext.fragments.registration import PREWARM_BUSY as BUSY
from sgl_kvext.fragments.registration import PrewarmBusy, Registration
from sgl_kvext.pages.keys import Tenant
from sgl_kvext.sglang_plugin import lookup, scheduler_gaps
from sgl_kvext.sglang_plugin.body_limit import BodyLimit
from sgl_kvext.sglang_plugin.surface import (
    HOOK_CONTROL,
    HTTP_APP_DEFAULT,
    HookRegistry,
    HookType,
    auth_level_admin,
    control_messages,
    http_server,
)

logger = logging.getLogger("sgl_kvext")
PREFIX = "kvext."
HTTP_APP = "sgl_kvext.sglang_plugin.http_app:app"
MAX_TEXTS = 4096
MAX_BODY_BYTES = 16 << 20
#: Tokens one pre-warm request may carry (chunking and hashing them on the scheduler thread
#: takes ~10 ms; a bigger corpus goes in several requests).
MAX_PREWARM_TOKENS = 1 << 18
RETRY_AFTER_S = 2

_registered = False
_routes_added = False


def register_hooks() -> None:
    global _registered
    if not _registered:
        HookRegistry.register(HOOK_CONTROL, _handle_control, HookType.AROUND)
        _registered = True




def _str_field(body: dict[str, Any], name: str) -> str:
    value = body.get(name, "")
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    return value


def _token_lists(body: dict[str, Any], max_text_tokens: int) -> list[list[int]]:
    """The tokenized texts the route sent, their sizes checked (no element is touched: the
    blender's conversion refuses what is not an int)."""
    lists = body.get("token_lists")
    if (not isinstance(lists, list) or not 1 <= len(lists) <= MAX_TEXTS
            or not all(isinstance(t, list) and t for t in lists)):
        raise ValueError(f"texts must be a list of 1..{MAX_TEXTS} non-empty strings")
    longest, total = max(len(t) for t in lists), sum(len(t) for t in lists)
    if longest > max_text_tokens:
        raise ValueError(f"a text of {longest} tokens; at most {max_text_tokens} (the model's "
                         "context)")
    if total > MAX_PREWARM_TOKENS:
        raise ValueError(f"the texts hold {total} tokens; at most {MAX_PREWARM_TOKENS} per "
                         "request: send the corpus in parts (prewarm_corpus does)")
    return lists


def handle(tree: Any, method: str, body: dict[str, Any]) -> dict[str, Any]:
    """Answer one ``kvext.`` control method in the scheduler; ValueError for bad input,
    :class:`~sgl_kvext.fragments.registration.PrewarmBusy` while the registration queue is full."""
    if method == lookup.METHOD:
        return lookup.handle(tree, body)
    if method == scheduler_gaps.METHOD:
        return scheduler_gaps.handle(body)
    blender = getattr(tree, "blender", None)
    if blender is None:
        raise ValueError("fragment blend is off: start the server with --kvext-fragment-blend")
    tenant = Tenant(_str_field(body, "extra_key"), _str_field(body, "cache_salt"), blend=True)
    if method == PREFIX + "prewarm":
        token_lists = _token_lists(body, blender.max_text_tokens)
        keys, queued = blender.prewarm_async(tenant, token_lists)
        return {"fragments": len(keys), "queued": queued, "keys": [k.hex() for k in keys]}
    if method == PREFIX + "fragments":
        keys = body.get("keys", [])
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError("keys must be a list of hex strings")
        try:
            raw = [bytes.fromhex(k) for k in keys]
        except ValueError:
            raise ValueError("keys must be a list of hex strings") from None
        states = [blender.registration(k) for k in raw]
        return {"known": [s is Registration.REGISTERED for s in states],
                "state": [s.value for s in states], "counters": dict(blender.counters)}
    raise ValueError(f"unknown method {method!r}; allowed: {PREFIX}prewarm, {PREFIX}fragments, "
                     f"{lookup.METHOD}, {scheduler_gaps.METHOD}")


def _handle_control(original: Any, self: Any, recv_req: Any) -> Any:
    if not str(getattr(recv_req, "method", "")).startswith(PREFIX):
        return original(self, recv_req)
    _, DumperControlReqOutput = control_messages()     # noqa: N806 (a class)
    try:
        result = handle(self.tree_cache, recv_req.method, recv_req.body)
        out = DumperControlReqOutput(success=True, response=[result])
    except Exception as exc:   # answered, never raised into the scheduler loop
        if not isinstance(exc, (ValueError, PrewarmBusy)):
            logger.exception("sgl-kvext: %s failed", recv_req.method)
        out = DumperControlReqOutput(success=False, response=[], error=str(exc))
    self.ipc_channels.send_to_tokenizer.send_output(out, recv_req)
    return None


def route_http_workers() -> None:
    """Make SGLang's extra HTTP workers (``--tokenizer-worker-num > 1``) serve the routes too:
    they import the app named by ``SGLANG_HTTP_SERVER_APP_PATH``, which becomes
    :mod:`sgl_kvext.sglang_plugin.http_app` (SGLang's app, or the one the user named there,
    plus the routes). Launcher process, before the server starts."""
    wrapped = env.get(env.SGLANG_HTTP_APP) or HTTP_APP_DEFAULT
    if wrapped != HTTP_APP:
        env.set_value(env.WRAPPED_HTTP_APP, wrapped)
        env.set_value(env.SGLANG_HTTP_APP, HTTP_APP)


def add_routes(config: KVExtConfig, app: Any = None) -> None:
    """Add the routes ``config`` calls for to ``app`` (default: SGLang's), once per process:
    the lookup and the scheduler's gaps with the tiers on, pre-warm with fragment blend too;
    and the bound on generation bodies (:mod:`.body_limit`)."""
    global _routes_added
    if _routes_added or not config.enabled:
        return
    DumperControlReqInput, _ = control_messages()        # noqa: N806 (a class)
    server = http_server()
    remote = lookup.RemoteTiers(config) if config.tiers.s3_url is not None else None

    async def control(method: str, request: Request) -> Any:
        raw = await _read_body(request)
        if raw is None:
            return _error(413, f"the body is over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        manager = server.get_global_state().tokenizer_manager
        if method in ("prewarm", "lookup"):
            try:
                body = await (_tokenized(manager, body) if method == "prewarm"
                              else _prompt_ids(manager, body))
            except ValueError as exc:
                return _error(400, str(exc))
        ask_remote = body.get("remote", True) if method == "lookup" else False
        if not isinstance(ask_remote, bool):
            return _error(400, "remote must be true or false")
        results = await manager.dumper_control(
            DumperControlReqInput(method=PREFIX + method, body=body))
        errors = [r.error for r in results if not r.success]
        if errors and errors[0].startswith(BUSY):
            return ORJSONResponse(status_code=429, content={"error": errors[0]},
                                  headers={"Retry-After": str(RETRY_AFTER_S)})
        if errors:
            return _error(400, errors[0])
        if method == "lookup":
            return ORJSONResponse(content=await lookup.answer(
                results[0].response[0], remote if ask_remote else None))
        return ORJSONResponse(content=results[0].response[0])

    admin = auth_level_admin()        # gated like SGLang's own control routes

    @admin
    async def prewarm(request: Request) -> Any:
        return await control("prewarm", request)

    @admin
    async def fragments(request: Request) -> Any:
        return await control("fragments", request)

    @admin
    async def lookup_route(request: Request) -> Any:
        return await control("lookup", request)

    @admin
    async def scheduler_route(request: Request) -> Any:
        return await control("scheduler", request)

    target = server.app if app is None else app
    target.add_middleware(BodyLimit, max_bytes=config.max_request_bytes)
    target.add_api_route("/kvext/lookup", lookup_route, methods=["POST"])
    target.add_api_route("/kvext/scheduler", scheduler_route, methods=["POST"])
    if config.fragments.enabled:
        target.add_api_route("/kvext/prewarm", prewarm, methods=["POST"])
        target.add_api_route("/kvext/fragments", fragments, methods=["POST"])
    _routes_added = True


def _error(status: int, message: str) -> Any:
    return ORJSONResponse(status_code=status, content={"error": message})


async def _read_body(request: Request) -> bytes | None:
    """The body, or None past :data:`MAX_BODY_BYTES` (read no further than that)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            return None
        parts.append(part)
    return b"".join(parts)


async def _prompt_ids(manager: Any, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with a ``text`` prompt replaced by its ``input_ids`` (off the event loop)."""
    text = body.get("text")
    if text is None:
        return body
    if not isinstance(text, str) or not text or "input_ids" in body:
        raise ValueError("send a non-empty text or input_ids, not both")
    tokenizer = manager.tokenizer
    if tokenizer is None:
        raise ValueError("the server has no tokenizer (--skip-tokenizer-init): send input_ids")
    ids = await asyncio.to_thread(lambda: list(tokenizer.encode(text)))
    return {**{k: v for k, v in body.items() if k != "text"}, "input_ids": ids}


async def _tokenized(manager: Any, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with its ``texts`` replaced by ``token_lists``, tokenized off the event loop."""
    texts = body.get("texts", [])
    if (not isinstance(texts, list) or not 1 <= len(texts) <= MAX_TEXTS
            or not all(isinstance(t, str) and t for t in texts)):
        raise ValueError(f"texts must be a list of 1..{MAX_TEXTS} non-empty strings")
    tokenizer = manager.tokenizer
    if tokenizer is None:
        raise ValueError("the server has no tokenizer (--skip-tokenizer-init)")
    lists = await asyncio.to_thread(
        lambda: [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts])
    rest = {k: v for k, v in body.items() if k not in ("texts", "token_lists")}
    return {**rest, "token_lists": lists}
