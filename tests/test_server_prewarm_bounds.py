"""No pre-warm request can stall or exhaust the scheduler (the shared fragment server, whose
registration queue holds 8 fragments): an oversized body, pre-warm or generation, is refused
unparsed (413), a text longer than the model's context and too many tokens per request are
refused (400), a full queue answers 429 with Retry-After and ``prewarm_corpus`` waits it out; texts
are tokenized by the HTTP side, and generation goes on throughout."""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
import uuid

import pytest
from fragments_common import ask, fragment_args
from server_pool import ServerPool
from tiers_common import Chain, seaweed_env

from sgl_kvext import prewarm_corpus
from sgl_kvext_bench.stall import post_huge_body

pytestmark = pytest.mark.e2e


def _post(url: str, body: bytes) -> tuple[int, dict[str, str], str]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, \
                resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read().decode()


def _text(words: int) -> str:
    rng = random.Random(uuid.uuid4().hex)
    return " ".join(rng.choice(("river", "stone", "lamp", "orbit", "cedar", "quartz", "harbor",
                                "violet", "engine", "meadow")) + str(rng.randrange(100))
                    for _ in range(words)) + "."


@pytest.mark.uses_server("fragments")
def test_prewarm_requests_are_bounded_and_generation_goes_on(servers: ServerPool,
                                                             chain: Chain) -> None:
    srv = servers.get("fragments", fragment_args(chain.s3_prefix + "-fragments",
                                                 chain.seaweed.endpoint),
                      seaweed_env(chain.seaweed))
    url = srv.url + "/kvext/prewarm"
    started = time.monotonic()
    assert post_huge_body(srv.url, 20 << 20) == 413 and time.monotonic() - started < 30
    # A generation body over --kvext-max-request-bytes (16 MiB) is refused unread too.
    assert post_huge_body(srv.url, 20 << 20, "/generate") == 413
    status, _, err = _post(url, json.dumps({"texts": [_text(9000)]}).encode())  # > 8,192
    assert status == 400 and "the model's context" in err, err
    status, _, err = _post(url, json.dumps({"texts": [_text(600) for _ in range(200)]})
                           .encode())                                 # > 262,144 tokens
    assert status == 400 and "send the corpus in parts" in err, err
    assert ask(srv, "Say hello.").output_ids                  # the scheduler is not stalled
    # A first request is always taken (here ~15 fragments for a queue of 8); the next one
    # meets the full queue while those register.
    first, _, _ = _post(url, json.dumps({"texts": [_text(400) for _ in range(3)]}).encode())
    second, headers, err = _post(url, json.dumps({"texts": [_text(50)]}).encode())
    assert first == 200 and second == 429, err
    assert int(headers.get("retry-after", "0")) >= 1 and "queue is full" in err
    result = prewarm_corpus(srv.url, [_text(50)], timeout_s=300)   # waits for its turn
    assert result.fragments >= 1
