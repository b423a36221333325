"""The real SGLang CPU server with --kvext-fragment-blend: RAG chunks seen in one prompt are
reused in another at different offsets, after different chunks, with other text before them,
found automatically (content-defined chunks) or marked by the request; exact-mode requests
and prompts without known fragments get exactly what the plain cache gives (token-equal to
transformers). float32 throughout (see test_server.py).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sgl_kvext import prewarm_corpus
from sgl_kvext.seaweedfs import SeaweedFS
from sgl_kvext.server import Completion, SGLangServer
from sgl_kvext_bench.rag_set import make_rag_set

pytestmark = pytest.mark.server

RAG = make_rag_set(documents=10, questions=4, chunks=(4, 4), sentences=24, seed=5)  # ~340 tokens
DOCS = RAG.documents
MAX_NEW = 8
ARGS = ["--dtype", "float32", "--enable-hierarchical-kv", "--kvext-fragment-blend",
        "--kvext-fragment-min-tokens", "16", "--kvext-host-size", "512MiB", "--enable-metrics"]
METRICS_SYNC_S = 1.5      # the exporter copies counters to /metrics once a second


def prompt(head: str, docs: list[int], question: str) -> str:
    return head + "".join(DOCS[d] + "\n" for d in docs) + f"Question: {question}\nAnswer:"


FIRST = prompt("Use the documents.\n", [0, 1, 2, 3], "Which project has code 1?")
# Documents 1 and 2 again, at other offsets, after another document, with other text first.
SECOND = prompt("Read these notes carefully, then answer briefly.\n", [5, 2, 1],
                "Which city is named?")
UNSEEN = prompt("Use the documents.\n", [6, 7], "Who is mentioned?")


def _metric(server: SGLangServer, name: str) -> float:
    time.sleep(METRICS_SYNC_S)
    total = 0.0
    for line in server.get_text("/metrics").splitlines():
        if line.startswith(f"kvext_fragment_{name}_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _wait_registered(server: SGLangServer, more_than: float, timeout_s: float = 120) -> float:
    """Wait until registration settles above ``more_than`` (unchanged for 3 s)."""
    deadline = time.monotonic() + timeout_s
    last, since = -1.0, time.monotonic()
    while time.monotonic() < deadline:
        now = _metric(server, "registered")
        if now != last:
            last, since = now, time.monotonic()
        elif now > more_than and time.monotonic() - since >= 3.0:
            return now
        time.sleep(0.5)
    raise AssertionError(f"registration did not settle above {more_than} in {timeout_s}s")


def _ask(server: SGLangServer, text: str, **custom: Any) -> Completion:
    return server.generate(text, max_new_tokens=MAX_NEW, custom_params=custom or None)


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    log = tmp_path_factory.mktemp("fragments") / "server.log"
    with SGLangServer(model_path, ARGS, log_path=log) as srv:
        yield srv


@pytest.fixture(scope="module")
def n_tokens(model_path: Path) -> Callable[[str], int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return lambda text: len(tok(text, add_special_tokens=False).input_ids)


@pytest.fixture(scope="module")
def expected(hf_greedy: Callable[..., list[list[int]]]) -> dict[str, list[int]]:
    outs = hf_greedy([SECOND, UNSEEN], MAX_NEW)
    return {"second": outs[0], "unseen": outs[1]}


def test_unseen_prompt_is_exact_and_not_blended(server: SGLangServer,
                                                expected: dict[str, list[int]]) -> None:
    out = _ask(server, UNSEEN)
    assert out.output_ids == expected["unseen"]
    assert _metric(server, "blends") == 0


def test_chunks_are_reused_at_other_offsets(server: SGLangServer,
                                            expected: dict[str, list[int]],
                                            n_tokens: Callable[[str], int]) -> None:
    _ask(server, FIRST)
    _wait_registered(server, 2)             # the automatic fragments of FIRST's documents
    exact = _ask(server, SECOND, kvext_exact=True)
    assert exact.output_ids == expected["second"]          # exact mode: never blended
    assert _metric(server, "blends") == 0
    blended = _ask(server, SECOND)
    assert _metric(server, "blends") == 1
    assert _metric(server, "fragment_hits") >= 2
    reused = _metric(server, "blended_tokens")
    assert reused >= 0.4 * (n_tokens(DOCS[1]) + n_tokens(DOCS[2]))
    assert blended.cached_tokens > exact.cached_tokens + reused * 0.9
    # The blend is approximate; exact-mode KV stays apart: asking exactly again is exact.
    assert _ask(server, SECOND, kvext_exact=True).output_ids == expected["second"]


def test_marked_chunks_are_reused_whole(server: SGLangServer,
                                        n_tokens: Callable[[str], int]) -> None:
    docs = [DOCS[8], DOCS[9]]
    first = prompt("Notes:\n", [8, 9], "Which project?")
    registered = _metric(server, "registered")
    _ask(server, first, kvext_chunks=docs)
    _wait_registered(server, registered + 1)
    before = _metric(server, "blended_tokens")
    second = prompt("Other notes, in another order:\n", [9, 4, 8], "Who?")
    out = _ask(server, second, kvext_chunks=docs)
    whole = _metric(server, "blended_tokens") - before
    assert whole >= 0.9 * sum(n_tokens(d) for d in docs)
    assert out.cached_tokens >= whole


def test_bad_fragment_options_are_refused(server: SGLangServer) -> None:
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as err:
        _ask(server, UNSEEN, kvext_exact="yes")
    assert err.value.code == 400
    assert "kvext_exact" in err.value.read().decode()


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
        assert _metric(a, "registered") >= result.fragments     # computed in A
    question = prompt("Context for the question below.\n", [3, 7], "Which code?")
    with SGLangServer(model_path, [*ARGS, *s3], log_path=tmp_path / "b.log", env=env) as b:
        _ask(b, question, kvext_chunks=corpus)          # B finds them in S3, computes none
        deadline = time.monotonic() + 60
        while _metric(b, "found_stored") < 2 and time.monotonic() < deadline:
            pass
        assert _metric(b, "found_stored") >= 2 and _metric(b, "registered") == 0
        # Another prompt with the same chunks (the first one's KV is in the radix tree).
        again = _ask(b, prompt("Different notes to read:\n", [7, 3], "Which code?"),
                     kvext_chunks=corpus)
        assert _metric(b, "blends") == 1
        assert _metric(b, "blended_tokens") >= 0.9 * sum(n_tokens(d) for d in corpus)
        assert again.cached_tokens >= 0.9 * sum(n_tokens(d) for d in corpus)
    with pytest.raises(ValueError, match="texts"):
        prewarm_corpus("http://127.0.0.1:9", [])
