"""A corpus pre-warmed into one server (sgl_kvext.prewarm_corpus) is found in S3 (SeaweedFS
on loopback) and blended by a second server that computes none of it; every HTTP worker
serves the pre-warm routes. The first server is the session's shared fragment server."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fragments_common import ARGS, DOCS, ask, fragment_args, metric, prompt
from server_pool import ServerPool
from tiers_common import Chain, seaweed_env

from sgl_kvext import prewarm_corpus
from sgl_kvext.harness.server import SGLangServer

pytestmark = pytest.mark.e2e


@pytest.mark.uses_server("fragments")
def test_prewarmed_corpus_is_hit_by_another_instance_through_s3(
        servers: ServerPool, chain: Chain, n_tokens: Callable[[str], int]) -> None:
    args = fragment_args(chain.s3_prefix + "-fragments", chain.seaweed.endpoint)
    env = seaweed_env(chain.seaweed)
    a = servers.get("fragments", args, env)
    corpus = [DOCS[7], DOCS[3]]
    result = prewarm_corpus(a.url, corpus, timeout_s=300)
    assert result.fragments >= 2
    assert metric(a, "registered") + metric(a, "found_stored") >= result.fragments
    question = prompt("Context for the question below.\n", [3, 7], "Which code?")
    b = servers.get("fragments-b", args, env)      # a fresh instance on the same S3 prefix
    ask(b, question, kvext_chunks=corpus)          # B finds them in S3, computes none
    deadline = time.monotonic() + 60
    while metric(b, "found_stored") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(b, "found_stored") >= 2 and metric(b, "registered") == 0
    # Another prompt with the same chunks (the first one's KV is in the radix tree).
    again = ask(b, prompt("Different notes to read:\n", [7, 3], "Which code?"),
                kvext_chunks=corpus)
    assert metric(b, "blends") >= 1   # the first may blend too once the lookup is back
    assert metric(b, "blended_tokens") >= 0.9 * sum(n_tokens(d) for d in corpus)
    assert again.cached_tokens >= 0.9 * sum(n_tokens(d) for d in corpus)
    with pytest.raises(ValueError, match="texts"):
        prewarm_corpus("http://127.0.0.1:9", [])


@pytest.mark.extended
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
    from sgl_kvext.config import env
    from sgl_kvext.sglang_plugin import prewarm
    from sgl_kvext.sglang_plugin.surface import HTTP_APP_DEFAULT

    monkeypatch.delenv(env.SGLANG_HTTP_APP, raising=False)
    monkeypatch.delenv(env.WRAPPED_HTTP_APP, raising=False)
    prewarm.route_http_workers()
    assert env.get(env.SGLANG_HTTP_APP) == prewarm.HTTP_APP
    assert env.get(env.WRAPPED_HTTP_APP) == HTTP_APP_DEFAULT
    monkeypatch.setenv(env.SGLANG_HTTP_APP, "my_gateway:asgi")     # a user's own app
    prewarm.route_http_workers()
    prewarm.route_http_workers()                                     # idempotent
    assert env.get(env.SGLANG_HTTP_APP) == prewarm.HTTP_APP
    assert env.get(env.WRAPPED_HTTP_APP) == "my_gateway:asgi"
