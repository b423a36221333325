"""The real SGLang CPU server's close-call gate: a blend whose first token is uncertain is
thrown away and its span computed exactly, so the answer is the exact one, token for token
(transformers in float32), and the response says so. With the gate at 0 nats every blend is
a close call. Its own server (~2 min with the test): behind ``extended``, so ``make test``
stays within its budget; the gate's logic is covered without a server in
test_blend_close_call.py and test_blend_jobs.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fragments_common import COMMON, DOCS, MAX_NEW, ask, metric, prompt, wait_registered
from server_pool import ServerPool

pytestmark = [pytest.mark.e2e, pytest.mark.extended, pytest.mark.uses_server("fragments-gate")]

GATED = [*COMMON, "--kvext-blend-fallback-entropy", "0"]


def test_a_close_call_is_answered_exactly_and_reported(
        servers: ServerPool, hf_greedy: Callable[..., list[list[int]]]) -> None:
    server = servers.get("fragments-gate", GATED)
    docs = [DOCS[4], DOCS[6]]
    registered = metric(server, "registered")
    ask(server, prompt("Notes:\n", [4, 6], "Which project?"), kvext_chunks=docs)
    wait_registered(server, registered + 1)
    text = prompt("Other notes, read them first:\n", [6, 1, 4], "Which city is named?")
    out = ask(server, text, kvext_chunks=docs)
    report = out.meta["kvext_blend"][0]
    assert report["outcome"] == "close_call", report
    assert report["first_token_entropy"] > 0 and report["marked_used"] == 2
    assert metric(server, "close_calls") == 1 and metric(server, "blends") == 0
    assert metric(server, "blended_tokens") == 0
    assert out.output_ids == hf_greedy([text], MAX_NEW)[0]       # the exact answer
