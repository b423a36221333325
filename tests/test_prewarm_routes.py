"""The pre-warm routes without a server: how the client splits a corpus, and the auth level
the routes get on SGLang's app (SGLang's own auth middleware decides)."""

from __future__ import annotations

from collections.abc import Callable

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


class _RegistrationFake:
    """A loopback stand-in for a server's two pre-warm routes whose registrations end as
    scripted (a tier refusing writes, an index forgetting keys: faults a real server shows
    only with a broken S3 or 65k+ fragments). ``states`` gives the n-th status answer's
    state for every key."""

    def __init__(self, states: Callable[[int], str]) -> None:
        import http.server
        import json
        import threading

        fake = self
        self.posts, self.polls = 0, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/kvext/prewarm":
                    fake.posts += 1
                    answer = {"keys": [f"k{len(t)}" for t in body["texts"]]}
                else:
                    state = states(fake.polls)
                    fake.polls += 1
                    answer = {"known": [state == "registered"] * len(body["keys"]),
                              "state": [state] * len(body["keys"])}
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def test_a_failed_registration_is_sent_again_then_reported() -> None:
    from sgl_kvext import PrewarmFailed, prewarm_corpus

    script = ["pending", "failed", "pending", "registered"]      # fails once, then lands
    fake = _RegistrationFake(lambda n: script[min(n, len(script) - 1)])
    try:
        result = prewarm_corpus(fake.url, ["a chunk"], timeout_s=30, poll_s=0.01)
        assert result.fragments == 1 and fake.posts == 2 and fake.polls == 4
    finally:
        fake.close()
    for state, why in (("failed", "1 refused or timed out by the server's last tier"),
                       ("unknown", "1 forgotten again (more fragments than the server's "
                                   "fragment index holds")):
        fake = _RegistrationFake(lambda n, state=state: state)
        try:
            with pytest.raises(PrewarmFailed, match=r"1 of 1 fragments could not be "
                                                    r"registered in 2 attempts: ") as err:
                prewarm_corpus(fake.url, ["a chunk"], timeout_s=30, poll_s=0.01, attempts=2)
            assert why in str(err.value) and fake.posts == 2        # never waits out 30 s
        finally:
            fake.close()
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        prewarm_corpus("http://127.0.0.1:9", ["a chunk"], attempts=0)
