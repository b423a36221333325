"""The pre-warm routes without a server: how the client splits a corpus, and the auth level
the routes get on SGLang's app (SGLang's own auth middleware decides)."""

from __future__ import annotations

import pytest


def test_prewarm_corpus_sends_a_big_corpus_in_parts() -> None:
    from sgl_kvext.fragments import prewarm_client

    texts = ["a" * 300_000, "b" * 300_000, "c" * 10, *["d"] * 2000, "e" * 900_000]
    parts = prewarm_client._parts(texts)
    assert [t for part in parts for t in part] == texts             # all, in order
    assert [len(p) for p in parts] == [1, 1024, 978, 1]   # by characters, by count, alone
    assert all(sum(map(len, p)) <= prewarm_client.PART_CHARS or len(p) == 1 for p in parts)


@pytest.mark.parametrize("api_key, admin_key, opens", [
    (None, None, {"none", "user", "admin"}),
    ("user-key", None, {"user"}),
    (None, "admin-key", {"admin"}),          # was open to anyone
    ("user-key", "admin-key", {"admin"}),    # the ordinary key sufficed
])
def test_kvext_routes_obey_sglangs_admin_level(monkeypatch: pytest.MonkeyPatch,
                                               api_key: str | None, admin_key: str | None,
                                               opens: set[str]) -> None:
    from fastapi import FastAPI
    from sglang.srt.utils.auth import add_api_key_middleware
    from starlette.testclient import TestClient

    from sgl_kvext.config.settings import FragmentConfig, KVExtConfig
    from sgl_kvext.sglang_plugin import prewarm

    monkeypatch.setattr(prewarm, "_routes_added", False)
    app = FastAPI()
    prewarm.add_routes(KVExtConfig(enabled=True, fragments=FragmentConfig(enabled=True)), app)
    add_api_key_middleware(app, api_key=api_key, admin_api_key=admin_key)
    client = TestClient(app, raise_server_exceptions=False)
    headers = {"none": {}, "user": {"Authorization": "Bearer user-key"},
               "admin": {"Authorization": "Bearer admin-key"}}
    for who, header in headers.items():
        for route in ("/kvext/prewarm", "/kvext/fragments", "/kvext/lookup"):
            status = client.post(route, content=b"[]", headers=header).status_code
            # Let in: the route answers (400: the body is not an object); kept out: 401.
            assert (status != 401) == (who in opens), (who, route, status)
