"""A bound on the body of SGLang's generation routes (``--kvext-max-request-bytes``).

SGLang parses a request's JSON on its HTTP event loop, so one huge body holds up every other
client's stream while it is parsed (measured: 1,024 ``kvext_chunks`` of 100k characters, a
100 MB body, delayed a decoding client's tokens by ~230 ms) and is held in memory whole. With
the plugin on, :class:`BodyLimit` answers HTTP 413 to a generation request whose declared
``Content-Length`` is over the bound without parsing a byte of it (the body is dropped as
it arrives, so the client reads the answer), and ends one sent without a length once its
bytes pass the bound (the route then sees a disconnected client). Other
routes (weight updates, the ``/kvext`` routes, which have their own bound) are untouched.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from sgl_kvext.config.values import format_size

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: SGLang's routes that take a prompt (and sgl-kvext's per-request options).
GENERATION_ROUTES = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})
#: Before a 413, the refused body is read and dropped (never parsed) for at most this long and
#: this many bytes, so a client that sends its whole body before reading gets the answer
#: instead of a connection reset (nginx's lingering close); past either, it is answered at once.
LINGER_S = 10.0
LINGER_BYTES = 256 << 20


class BodyLimit:
    """ASGI middleware: generation bodies of at most ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("path") not in GENERATION_ROUTES:
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _linger(receive)         # uvicorn reads no more once the answer is sent
            await self._refuse(send)
            return
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:      # no length declared: stop reading here
                    return {"type": "http.disconnect"}
            return message

        await self.app(scope, bounded, send)

    async def _refuse(self, send: Send) -> None:
        """HTTP 413 naming the bound; the connection closes after it."""
        body = json.dumps({"error": f"the request body is over {format_size(self.max_bytes)} "
                                    "(--kvext-max-request-bytes)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


async def _linger(receive: Receive) -> None:
    """Read and drop the rest of a refused body, within :data:`LINGER_S` and
    :data:`LINGER_BYTES`."""

    async def drain() -> None:
        dropped = 0
        while dropped <= LINGER_BYTES:
            message = await receive()
            if message.get("type") != "http.request" or not message.get("more_body"):
                return
            dropped += len(message.get("body", b""))

    try:
        await asyncio.wait_for(drain(), LINGER_S)
    except TimeoutError:
        pass
