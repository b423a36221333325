"""BodyLimit: a generation body over the bound is refused unread (declared length) or cut off
(no length declared); other routes and bodies within the bound pass untouched."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from sgl_kvext.sglang_plugin.body_limit import BodyLimit

pytestmark = pytest.mark.unit

LIMIT = 1 << 20


def _client() -> tuple[TestClient, list[int]]:
    app, reads = FastAPI(), list[int]()

    async def echo(request: Request) -> dict[str, int]:
        body = await request.body()         # Starlette raises on a disconnect mid-body
        reads.append(len(body))
        return {"bytes": len(body)}

    for path in ("/generate", "/v1/chat/completions", "/update_weights_from_tensor"):
        app.add_api_route(path, echo, methods=["POST"])
    app.add_middleware(BodyLimit, max_bytes=LIMIT)
    return TestClient(app, raise_server_exceptions=False), reads


def test_a_declared_oversized_generation_body_is_refused_unparsed() -> None:
    client, reads = _client()
    resp = client.post("/generate", content=b"x" * (LIMIT + 1))
    assert resp.status_code == 413
    assert "over 1MiB (--kvext-max-request-bytes)" in resp.json()["error"]
    assert reads == []                                  # the route never ran


def test_bodies_within_the_bound_and_other_routes_pass() -> None:
    client, reads = _client()
    assert client.post("/v1/chat/completions", content=b"x" * LIMIT).json() == {"bytes": LIMIT}
    big = client.post("/update_weights_from_tensor", content=b"x" * (LIMIT + 1))
    assert big.json() == {"bytes": LIMIT + 1}           # not a generation route
    assert reads == [LIMIT, LIMIT + 1]


def test_an_undeclared_oversized_body_is_cut_off() -> None:
    client, reads = _client()

    def chunks():                                       # streamed: no Content-Length
        for _ in range(3):
            yield b"y" * (LIMIT // 2 + 1)

    resp = client.post("/generate", content=chunks())
    assert resp.status_code != 200 and reads == []      # the route saw a disconnect
    ok = client.post("/generate", content=iter([json.dumps({"text": "hi"}).encode()]))
    assert ok.status_code == 200
