"""The real SGLang CPU server with --enable-hierarchical-kv: a prefix evicted from the
device pool comes back from the tiers (host, disk, S3 on SeaweedFS) with greedy output
identical to transformers; another instance sharing the S3 prefix, and one on the same disk
folder (a restart), hit what was written; concurrent requests stay exact; corrupt tier
objects mean recompute.

Most tests share the session's every-tier server (``chain``), each under its own tenant;
the ``extended`` ones start a server per tier. float32 throughout (see test_server.py). The
device pool is tiny (--max-total-tokens) so the filler prompts evict the context.
"""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from server_pool import ServerPool, salt
from tiers_common import (
    FILLERS,
    FROM_TIER,
    MAX_NEW,
    METRICS_WAIT_S,
    PROMPTS,
    Chain,
    KVEvents,
    ask,
    evict_context,
    metric,
    metrics,
    seaweed_env,
    tier_args,
    tier_server,
)

from sgl_kvext.harness.seaweedfs import SeaweedFS

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def expected(hf_greedy: Callable[..., list[list[int]]]) -> list[list[int]]:
    return hf_greedy(PROMPTS, MAX_NEW)


@pytest.mark.uses_server("chain")
def test_evicted_prefix_comes_back_exact_from_the_tiers(servers: ServerPool, chain: Chain,
                                                       expected: list[list[int]]) -> None:
    srv, tenant = chain.server(servers), salt()
    events = KVEvents(chain.events_port)
    try:
        before = metrics(srv)
        first = ask(srv, 0, tenant)
        evict_context(srv)
        second = ask(srv, 1, tenant)
        after = metrics(srv)
        # Every tier's residency is published beside the device tree's (tier_events.py).
        heard = events.wait_for(srv, {"GPU", "CPU_PINNED", "DISK", "EXTERNAL"})
    finally:
        events.close()
    assert {"GPU", "CPU_PINNED", "DISK", "EXTERNAL"} <= heard, heard
    assert first.output_ids == expected[0]
    assert second.output_ids == expected[1]
    assert second.cached_tokens >= FROM_TIER, second
    loaded = metric(after, "kvext_loaded_pages_total") - metric(before, "kvext_loaded_pages_total")
    hits = metric(after, "kvext_tier_hits_total") - metric(before, "kvext_tier_hits_total")
    assert loaded >= FROM_TIER // 32 and hits > 0


@pytest.mark.uses_server("chain")
def test_concurrent_requests_while_the_prefix_is_evicted(servers: ServerPool, chain: Chain,
                                                         expected: list[list[int]]) -> None:
    srv, tenant = chain.server(servers), salt()
    assert ask(srv, 0, tenant).output_ids == expected[0]
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        fillers = [pool.submit(srv.generate, f, 2) for f in FILLERS]
        asks = [pool.submit(ask, srv, i, tenant) for i in (0, 1)]
        results = [a.result(timeout=600) for a in asks]
        for f in fillers:
            f.result(timeout=600)
    again = ask(srv, 1, tenant)
    assert [r.output_ids for r in results] == expected
    assert again.output_ids == expected[1] and again.cached_tokens >= FROM_TIER


@pytest.mark.uses_server("chain")
def test_another_instance_and_a_restart_hit_what_was_written(servers: ServerPool, chain: Chain,
                                                             expected: list[list[int]],
                                                             model_path: Path) -> None:
    # Last of the chain server's users: the readers below take the pool's places.
    tenant = salt()
    writer = chain.server(servers)
    assert ask(writer, 0, tenant).output_ids == expected[0]   # written through
    # A chat's history, sent as token ids the way its next turn continues it; a tenant of
    # its own, so the reader's device tree never holds it.
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_path)(PROMPTS[1]).input_ids
    chat = salt()
    history = writer.generate(ids, MAX_NEW, cache_salt=chat)
    held = len(ids) + len(history.output_ids) - 1     # tokens with KV (not the last one)
    assert held % 32, "the history must end inside a 32-token tier page"
    # A second instance, running at the same time, shares only the S3 prefix.
    shared = ask(chain.s3_reader(servers), 1, tenant)
    assert shared.output_ids == expected[1] and shared.cached_tokens >= FROM_TIER
    # A fresh instance on the same disk folder (no S3) warm-starts from it.
    reader = chain.disk_reader(servers)
    warm = ask(reader, 1, tenant)
    assert warm.output_ids == expected[1] and warm.cached_tokens >= FROM_TIER
    # The history's next turn: every token the writer held comes back, its last partial
    # page too (a tail object another process wrote, sgl_kvext/pages/tails.py).
    turn = reader.generate(ids + history.output_ids + ids[-8:], 2, cache_salt=chat)
    assert turn.cached_tokens >= held, (turn.cached_tokens, held)


@pytest.mark.extended
@pytest.mark.parametrize("tier", ["host", "disk", "s3"])
def test_evicted_prefix_comes_back_exact(tier: str, model_path: Path, log_dir: Path,
                                         tmp_path: Path, seaweed: SeaweedFS,
                                         expected: list[list[int]]) -> None:
    with tier_server(model_path, log_dir, tier, "--enable-metrics",
                 *tier_args(tier, tmp_path, seaweed), env=seaweed_env(seaweed)) as server:
        first = ask(server, 0)
        evict_context(server, below_host=tier != "host")
        second = ask(server, 1)
        time.sleep(METRICS_WAIT_S)                 # the exporter's copies (BASE)
        metrics = server.get_text("/metrics")
        log = server.log_path.read_text()
    assert first.output_ids == expected[0]
    assert second.output_ids == expected[1]
    assert second.cached_tokens >= FROM_TIER, second
    assert "sgl-kvext: HierarchicalRadixCache active" in log
    assert metric(metrics, "kvext_loaded_pages_total") >= FROM_TIER // 32
    assert metric(metrics, "kvext_tier_hits_total", tier) > 0     # served from this tier
    if tier == "s3":    # remote pages come up through a prefetch (read ahead for the
        # request, or promoted); disk pages may be read straight into the pool
        assert metric(metrics, "kvext_prefetch_promoted_pages_total") \
            + metric(metrics, "kvext_ahead_pages_total") > 0


@pytest.mark.extended
def test_corrupt_disk_objects_mean_recompute(model_path: Path, log_dir: Path, tmp_path: Path,
                                             expected: list[list[int]]) -> None:
    disk = tmp_path / "disk"
    args = ["--kvext-host-size", "40MiB", "--kvext-disk-dir", str(disk)]
    with tier_server(model_path, log_dir, "corrupt", *args) as server:
        assert ask(server, 0).output_ids == expected[0]
        evict_context(server, below_host=True)
        objects = sorted((disk / "objects").rglob("*.kvx"))
        assert objects
        for path in objects:                       # flip a byte in every stored page
            blob = bytearray(path.read_bytes())
            blob[len(blob) // 2] ^= 0x20
            path.write_bytes(bytes(blob))
        second = ask(server, 1)
    assert second.output_ids == expected[1]
    assert second.cached_tokens < FROM_TIER        # nothing corrupt was served
    assert any((disk / "quarantine").iterdir())


@pytest.mark.extended
def test_restart_and_second_instance_hit(model_path: Path, log_dir: Path, tmp_path: Path,
                                         seaweed: SeaweedFS, expected: list[list[int]]) -> None:
    disk = tmp_path / "shared-disk"
    s3_url = f"s3://kvext-e2e/{uuid.uuid4().hex}"
    env = seaweed_env(seaweed)
    with tier_server(model_path, log_dir, "writer", "--kvext-disk-dir", str(disk),
                 "--kvext-s3-url", s3_url, "--kvext-s3-endpoint", seaweed.endpoint,
                 env=env) as writer:
        assert ask(writer, 0).output_ids == expected[0]
        # A second instance, running at the same time, shares only the S3 prefix.
        with tier_server(model_path, log_dir, "reader", "--kvext-s3-url", s3_url,
                     "--kvext-s3-endpoint", seaweed.endpoint, env=env) as reader:
            shared = ask(reader, 1)
    assert shared.output_ids == expected[1] and shared.cached_tokens >= FROM_TIER
    # A restart on the same disk folder (no S3) warm-starts from it.
    with tier_server(model_path, log_dir, "restart", "--kvext-disk-dir", str(disk)) as restarted:
        warm = ask(restarted, 1)
    assert warm.output_ids == expected[1] and warm.cached_tokens >= FROM_TIER
