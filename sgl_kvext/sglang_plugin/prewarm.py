"""Corpus pre-warming over HTTP: ``POST /kvext/prewarm`` and ``POST /kvext/fragments``.

The routes are added to SGLang's FastAPI app in the launcher process (only with
``--kvext-fragment-blend``). They reach the scheduler through SGLang's generic control
message (``DumperControlReqInput`` with a ``kvext.`` method; an AROUND hook on
``Scheduler.handle_dumper_control`` answers those and passes every other method on), so no
new message type is needed.

- ``kvext.prewarm`` tokenizes each text, queues the whole text and its automatic fragments for
  registration in the request namespace that may receive blended KV, and answers at once with
  the fragment keys; registration runs on the blender's worker thread, never on the
  scheduler's.
- ``kvext.fragments`` answers which of the given keys are registered (stored and written
  through the tier chain).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request  # module level: FastAPI resolves the string annotations here
from fastapi.responses import ORJSONResponse

from sgl_kvext.config import env
from sgl_kvext.pages.keys import Tenant
from sgl_kvext.sglang_plugin.surface import (
    HOOK_CONTROL,
    HTTP_APP_DEFAULT,
    HookRegistry,
    HookType,
    control_messages,
    http_server,
)

logger = logging.getLogger("sgl_kvext")
PREFIX = "kvext."
HTTP_APP = "sgl_kvext.sglang_plugin.http_app:app"
MAX_TEXTS = 4096

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


def handle(tree: Any, tokenizer: Any, method: str, body: dict[str, Any]) -> dict[str, Any]:
    """Answer one ``kvext.`` control method in the scheduler; ValueError for bad input."""
    blender = getattr(tree, "blender", None)
    if blender is None:
        raise ValueError("fragment blend is off: start the server with --kvext-fragment-blend")
    tenant = Tenant(_str_field(body, "extra_key"), _str_field(body, "cache_salt"), blend=True)
    if method == PREFIX + "prewarm":
        texts = body.get("texts", [])
        if (not isinstance(texts, list) or not texts or len(texts) > MAX_TEXTS
                or not all(isinstance(t, str) and t for t in texts)):
            raise ValueError(f"texts must be a list of 1..{MAX_TEXTS} non-empty strings")
        if tokenizer is None:
            raise ValueError("the server has no tokenizer (--skip-tokenizer-init)")
        token_lists = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
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
        return {"known": [blender.index.known(k) for k in raw],
                "counters": dict(blender.counters)}
    raise ValueError(f"unknown method {method!r}; allowed: {PREFIX}prewarm, {PREFIX}fragments")


def _handle_control(original: Any, self: Any, recv_req: Any) -> Any:
    if not str(getattr(recv_req, "method", "")).startswith(PREFIX):
        return original(self, recv_req)
    _, DumperControlReqOutput = control_messages()     # noqa: N806 (a class)
    try:
        result = handle(self.tree_cache, getattr(self, "tokenizer", None), recv_req.method,
                        recv_req.body)
        out = DumperControlReqOutput(success=True, response=[result])
    except Exception as exc:   # answered, never raised into the scheduler loop
        if not isinstance(exc, ValueError):
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


def add_routes(app: Any = None) -> None:
    """Add the two routes to ``app`` (default: SGLang's), once per process."""
    global _routes_added
    if _routes_added:
        return
    DumperControlReqInput, _ = control_messages()        # noqa: N806 (a class)
    server = http_server()

    async def control(method: str, request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return ORJSONResponse(status_code=400,
                                  content={"error": "the body must be a JSON object"})
        manager = server.get_global_state().tokenizer_manager
        results = await manager.dumper_control(
            DumperControlReqInput(method=PREFIX + method, body=body))
        errors = [r.error for r in results if not r.success]
        if errors:
            return ORJSONResponse(status_code=400, content={"error": errors[0]})
        return ORJSONResponse(content=results[0].response[0])

    async def prewarm(request: Request) -> Any:
        return await control("prewarm", request)

    async def fragments(request: Request) -> Any:
        return await control("fragments", request)

    target = server.app if app is None else app
    target.add_api_route("/kvext/prewarm", prewarm, methods=["POST"])
    target.add_api_route("/kvext/fragments", fragments, methods=["POST"])
    _routes_added = True
