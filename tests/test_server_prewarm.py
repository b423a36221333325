"""A corpus pre-warmed into one server (sgl_kvext.prewarm_corpus) is found in S3 (SeaweedFS
on loopback) and blended by a second server that computes none of it. Its own module: one
server at a time (two CPU servers at once exhaust this machine's memory)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from fragments_common import ARGS, DOCS, ask, metric, prompt

from sgl_kvext import prewarm_corpus
from sgl_kvext.seaweedfs import SeaweedFS
from sgl_kvext.server import SGLangServer

pytestmark = pytest.mark.server


def test_prewarmed_corpus_is_hit_by_another_instance_through_s3(
        model_path: Path, tmp_path: Path, seaweed: SeaweedFS,
        n_tokens: Callable[[str], int]) -> None:
    creds = seaweed.credentials
    env = {"AWS_ACCESS_KEY_ID": creds["aws_access_key_id"],
           "AWS_SECRET_ACCESS_KEY": creds["aws_secret_access_key"]}
    s3 = ["--kvext-s3-url", f"s3://kvext-e2e/{uuid.uuid4().hex}",
          "--kvext-s3-endpoint", seaweed.endpoint]
    corpus = [DOCS[7], DOCS[3]]
    with SGLangServer(model_path, [*ARGS, *s3], log_path=tmp_path / "a.log", env=env) as a:
        result = prewarm_corpus(a.url, corpus, timeout_s=300)
        assert result.fragments >= 2
        assert metric(a, "registered") >= result.fragments     # computed in A
    question = prompt("Context for the question below.\n", [3, 7], "Which code?")
    with SGLangServer(model_path, [*ARGS, *s3], log_path=tmp_path / "b.log", env=env) as b:
        ask(b, question, kvext_chunks=corpus)          # B finds them in S3, computes none
        deadline = time.monotonic() + 60
        while metric(b, "found_stored") < 2 and time.monotonic() < deadline:
            pass
        assert metric(b, "found_stored") >= 2 and metric(b, "registered") == 0
        # Another prompt with the same chunks (the first one's KV is in the radix tree).
        again = ask(b, prompt("Different notes to read:\n", [7, 3], "Which code?"),
                     kvext_chunks=corpus)
        assert metric(b, "blends") >= 1   # the first may blend too once the lookup is back
        assert metric(b, "blended_tokens") >= 0.9 * sum(n_tokens(d) for d in corpus)
        assert again.cached_tokens >= 0.9 * sum(n_tokens(d) for d in corpus)
    with pytest.raises(ValueError, match="texts"):
        prewarm_corpus("http://127.0.0.1:9", [])


def test_prewarm_is_served_by_every_http_worker(model_path: Path, tmp_path: Path) -> None:
    # SGLang's extra HTTP workers load no plugins; before the plugin pointed them at its own
    # app, every /kvext/* request to a 2-worker server was a 404.
    args = [*ARGS, "--tokenizer-worker-num", "2"]
    with SGLangServer(model_path, args, log_path=tmp_path / "workers.log") as server:
        first = prewarm_corpus(server.url, [DOCS[5]], timeout_s=300)
        assert first.fragments >= 1
        for _ in range(6):        # fresh connections, spread over the workers; all answer
            assert prewarm_corpus(server.url, [DOCS[5]], timeout_s=60).fragments == \
                first.fragments


def test_http_workers_import_the_wrapped_app(monkeypatch: pytest.MonkeyPatch) -> None:
    from sgl_kvext import env
    from sgl_kvext.integration import prewarm

    monkeypatch.delenv(env.SGLANG_HTTP_APP, raising=False)
    monkeypatch.delenv(env.WRAPPED_HTTP_APP, raising=False)
    prewarm.route_http_workers()
    assert env.get(env.SGLANG_HTTP_APP) == prewarm.HTTP_APP
    assert env.get(env.WRAPPED_HTTP_APP) == env.SGLANG_HTTP_APP_DEFAULT
    monkeypatch.setenv(env.SGLANG_HTTP_APP, "my_gateway:asgi")     # a user's own app
    prewarm.route_http_workers()
    prewarm.route_http_workers()                                     # idempotent
    assert env.get(env.SGLANG_HTTP_APP) == prewarm.HTTP_APP
    assert env.get(env.WRAPPED_HTTP_APP) == "my_gateway:asgi"
