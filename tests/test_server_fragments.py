"""The real SGLang CPU server with --kvext-fragment-blend: RAG chunks seen in one prompt are
reused in another at different offsets, after different chunks, with other text before them,
found automatically (content-defined chunks) or marked by the request; exact-mode requests
and prompts without known fragments get exactly what the plain cache gives (token-equal to
transformers). float32 throughout (see test_server.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fragments_common import (
    AGAIN,
    DOCS,
    FIRST,
    MAX_NEW,
    SECOND,
    UNSEEN,
    ask,
    fragment_args,
    metric,
    prompt,
    wait_registered,
)
from server_pool import ServerPool
from tiers_common import Chain, seaweed_env

from sgl_kvext.harness.server import SGLangServer

pytestmark = [pytest.mark.e2e, pytest.mark.uses_server("fragments")]


@pytest.fixture
def server(servers: ServerPool, chain: Chain) -> SGLangServer:
    """The session's fragment server (its S3 tier is the chain's bucket, another prefix)."""
    return servers.get("fragments", fragment_args(chain.s3_prefix + "-fragments",
                                                  chain.seaweed.endpoint),
                       seaweed_env(chain.seaweed))


@pytest.fixture(scope="module")
def expected(hf_greedy: Callable[..., list[list[int]]]) -> dict[str, list[int]]:
    outs = hf_greedy([SECOND, UNSEEN], MAX_NEW)
    return {"second": outs[0], "unseen": outs[1]}


def test_unseen_prompt_is_exact_and_not_blended(server: SGLangServer,
                                                expected: dict[str, list[int]]) -> None:
    out = ask(server, UNSEEN)
    assert out.output_ids == expected["unseen"]
    assert metric(server, "blends") == 0


def test_chunks_are_reused_at_other_offsets(server: SGLangServer,
                                            expected: dict[str, list[int]],
                                            n_tokens: Callable[[str], int]) -> None:
    registered, seen_once = metric(server, "registered"), metric(server, "seen_once")
    ask(server, FIRST)          # automatic fragments register once seen at a second position
    assert metric(server, "seen_once") > seen_once
    ask(server, AGAIN)                     # documents 2 and 1 elsewhere in another prompt
    wait_registered(server, registered + 1)   # the automatic fragments of those documents
    exact = ask(server, SECOND, kvext_exact=True)
    assert exact.output_ids == expected["second"]          # exact mode: never blended
    assert metric(server, "blends") == 0
    blended = ask(server, SECOND)
    assert metric(server, "blends") == 1
    assert metric(server, "fragment_hits") >= 2
    reused = metric(server, "blended_tokens")
    assert reused >= 0.4 * (n_tokens(DOCS[1]) + n_tokens(DOCS[2]))
    assert blended.cached_tokens > exact.cached_tokens + reused * 0.9
    # The blend is approximate; exact-mode KV stays apart: asking exactly again is exact.
    assert ask(server, SECOND, kvext_exact=True).output_ids == expected["second"]


def test_marked_chunks_are_reused_whole(server: SGLangServer,
                                        n_tokens: Callable[[str], int]) -> None:
    docs = [DOCS[8], DOCS[9]]
    first = prompt("Notes:\n", [8, 9], "Which project?")
    registered = metric(server, "registered")
    ask(server, first, kvext_chunks=docs)
    wait_registered(server, registered + 1)
    before = metric(server, "blended_tokens")
    second = prompt("Other notes, in another order:\n", [9, 4, 8], "Who?")
    out = ask(server, second, kvext_chunks=docs)
    whole = metric(server, "blended_tokens") - before
    assert whole >= 0.9 * sum(n_tokens(d) for d in docs)
    assert out.cached_tokens >= whole


def _thread_nice_values(pgid: int) -> list[int]:
    """The nice value of every thread of every process in process group ``pgid``."""
    nices = []
    for stat in Path("/proc").glob("[0-9]*/task/[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue                                    # exited meanwhile
        if int(fields[2]) == pgid:                      # stat fields 5 (pgrp) and 19 (nice)
            nices.append(int(fields[16]))
    return nices


def test_registration_thread_yields_the_cpu_to_serving(server: SGLangServer) -> None:
    # Fragment registration computes on the CPU serving uses; it runs at nice 19 so serving
    # keeps its speed (bench: an equal-priority registration thread halved prefill speed).
    nices = _thread_nice_values(server.pid)
    assert 19 in nices and 0 in nices


def _ask_as(server: SGLangServer, salt: str, text: str, chunks: list[str]) -> int:
    """Tenant ``salt`` asks ``text`` marking ``chunks``; its cached prompt tokens."""
    return server.generate(text, MAX_NEW, custom_params={"kvext_chunks": chunks},
                           cache_salt=salt).cached_tokens


def test_tenants_never_share_fragments(server: SGLangServer) -> None:
    docs = [DOCS[4], DOCS[6]]
    registered = metric(server, "registered")
    _ask_as(server, "tenant-a", prompt("Notes:\n", [4, 6], "Which project?"), docs)
    wait_registered(server, registered + 1)
    later = prompt("Other notes, in another order:\n", [6, 0, 4], "Who?")
    hits, blended = metric(server, "fragment_hits"), metric(server, "blended_tokens")
    b_cached = _ask_as(server, "tenant-b", later, docs)        # A's chunks: not for B
    assert b_cached == 0
    assert metric(server, "fragment_hits") == hits
    assert metric(server, "blended_tokens") == blended
    a_cached = _ask_as(server, "tenant-a", later, docs)        # ... but they are for A
    assert metric(server, "blended_tokens") > blended and a_cached > 0


HOSTILE = [{"kvext_exact": "yes"}, {"kvext_chunks": "one string"}, {"kvext_chunks": [""]},
           {"kvext_chunks": [1, 2]}, {"kvext_chunk_spans": [5]},
           {"kvext_chunk_spans": [9, 3]}, {"kvext_chunk_spans": [0, 2**40]},
           {"kvext_chunk_spans": [0, 1] * 1025}, {"kvext_chunks": ["x"] * 1025},
           {"kvext_chunk": ["typo"]}]


def test_hostile_fragment_options_are_400_and_the_server_goes_on(
        server: SGLangServer, expected: dict[str, list[int]]) -> None:
    import urllib.error

    for options in HOSTILE:
        with pytest.raises(urllib.error.HTTPError) as err:
            ask(server, UNSEEN, **options)
        assert err.value.code == 400, options
        body = err.value.read().decode()
        assert next(iter(options)).rstrip("_") in body or "custom_params" in body, body
    assert ask(server, UNSEEN).output_ids == expected["unseen"]    # the scheduler is alive


def test_chunks_larger_than_the_prompt_are_refused_before_the_scheduler(
        server: SGLangServer, expected: dict[str, list[int]]) -> None:
    import time
    import urllib.error

    # 1,024 chunks of 100k characters (100 MB): once the scheduler thread tokenized them all
    # (minutes) while every other request waited; now the body is refused unread (over
    # --kvext-max-request-bytes), and 100 such chunks (10 MB) by the tokenizer manager.
    started = time.perf_counter()
    with pytest.raises(urllib.error.HTTPError) as err:
        ask(server, UNSEEN, kvext_chunks=["word " * 20_000] * 1024)
    assert err.value.code == 413 and "--kvext-max-request-bytes" in err.value.read().decode()
    with pytest.raises(urllib.error.HTTPError) as err:
        ask(server, UNSEEN, kvext_chunks=["word " * 20_000] * 100)
    assert err.value.code == 400 and "characters in all" in err.value.read().decode()
    assert time.perf_counter() - started < 60
    assert ask(server, UNSEEN).output_ids == expected["unseen"]    # the scheduler is alive


def test_marked_chunk_partly_in_the_cached_prefix_is_still_reused(
        server: SGLangServer, n_tokens: Callable[[str], int]) -> None:
    # Two prompts with the same head: the second one's cached prefix (the head plus the
    # first tokens its first document shares with the first prompt's, "Document") ends
    # inside its first marked document. That document's stored KV is still reused, whole
    # but for the tokens the prefix already holds.
    from sgl_kvext import prewarm_corpus

    head = "Answer from these documents only.\n"
    prewarm_corpus(server.url, [DOCS[2], DOCS[7]], timeout_s=300)
    ask(server, prompt(head, [0, 1], "Which project?"), kvext_chunks=[DOCS[0], DOCS[1]])
    before = metric(server, "blended_tokens")
    out = ask(server, prompt(head, [7, 2], "Who?"), kvext_chunks=[DOCS[7], DOCS[2]])
    reused = metric(server, "blended_tokens") - before
    whole = n_tokens(DOCS[7]) + n_tokens(DOCS[2])
    assert reused >= whole - 12, (reused, whole)      # each marked core, less the shared head
    assert out.cached_tokens >= reused
    # The response says what happened.
    report = out.meta["kvext_blend"][0]
    assert report["outcome"] == "blended" and report["marked_dropped"] == []
    assert report["marked_used"] == 2 and report["marked_partial"] == 1
    assert report["auto_used"] == 0 and report["reused_tokens"] == reused
    assert 0 < report["recomputed_tokens"] < report["end"] - report["start"]
    steps = report["seconds"]                  # where the blend's time went, every step timed
    assert set(steps) == {"prefix", "fetch", "place", "check_layers", "later_layers", "write"}
    assert all(v > 0 for v in steps.values()), steps


def test_documents_after_a_page_hit_in_the_tiers_are_still_blended(
        server: SGLangServer) -> None:
    """A blend-namespace prompt whose head the tiers hold as pages (an earlier prompt's KV,
    written through, gone from the device) still blends the marked documents after it: the
    page run used to end the match, and in the RAG bench 90 of 200 prompts ran unblended."""
    from sgl_kvext import prewarm_corpus

    head = "Records follow; answer from them alone.\n"
    prewarm_corpus(server.url, [DOCS[3], DOCS[4], DOCS[8]], timeout_s=300)
    ask(server, prompt(head, [3, 4], "Which project?"), kvext_chunks=[DOCS[3], DOCS[4]])
    server.flush_cache()                 # the device tree is emptied; the tiers keep its pages
    blends = metric(server, "blends")
    out = ask(server, prompt(head, [3, 8], "Which city?"), kvext_chunks=[DOCS[3], DOCS[8]])
    report = out.meta["kvext_blend"][0]
    assert report["outcome"] == "blended", report
    assert report["marked_used"] == 2 and metric(server, "blends") == blends + 1


def test_every_blend_namespace_request_reports_its_blend(server: SGLangServer) -> None:
    text = prompt("A prompt whose marks are not stored yet.\n", [6, 9], "Which city?")
    spans = [0, 1, 3, 2]                       # too short; reversed (refused with 400 first)
    out = ask(server, text, kvext_chunks=[DOCS[6]], kvext_chunk_spans=spans[:2])
    report = out.meta["kvext_blend"][0]
    assert report["outcome"] in ("nothing_stored", "little_reuse", "blended")
    reasons = {d[2] for d in report["marked_dropped"]}
    assert "shorter than 2 tokens" in reasons
    assert "kvext_blend" not in ask(server, text, kvext_exact=True).meta   # exact: no blend


def _scheduler_window(server: SGLangServer, body: object) -> dict:
    import json
    import urllib.request

    req = urllib.request.Request(server.url + "/kvext/scheduler", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return dict(json.loads(resp.read()))


def test_scheduler_route_times_the_passes_of_a_request(server: SGLangServer) -> None:
    import urllib.error

    _scheduler_window(server, {"reset": True})
    ask(server, UNSEEN)                                  # a prefill, then MAX_NEW - 1 decodes
    got = _scheduler_window(server, {"reset": True})
    assert got["batches"] >= MAX_NEW, got
    assert 0 < got["longest_forward_s"] <= got["forward_s"] < got["window_s"], got
    assert 0 < got["longest_gap_s"] < got["window_s"], got     # between its own decode steps
    parts = got["longest_gap_parts"]            # SGLang's loop phases, hooked in the server
    # Every pass receives and schedules before it runs a batch; a result is processed right
    # after its forward (the harness turns SGLang's overlap loop off on CPU; with it on, a
    # result is processed one pass late), so these are all a gap may hold.
    assert {"sglang.ingest_requests", "sglang.get_next_batch_to_run"} <= set(parts), got
    assert set(parts) <= {"sglang.ingest_requests", "sglang.get_next_batch_to_run",
                          "sglang.process_batch_result", "admit", "write_through"}, got
    assert all(0 <= s <= got["longest_gap_s"] for s in parts.values()), got
    fresh = _scheduler_window(server, {})               # a new window: nothing ran since
    assert fresh["batches"] == 0 and fresh["longest_gap_s"] == 0.0, fresh
    with pytest.raises(urllib.error.HTTPError) as err:
        _scheduler_window(server, {"reset": "yes"})
    assert err.value.code == 400 and b"reset must be true or false" in err.value.read()
