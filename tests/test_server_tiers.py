"""The real SGLang CPU server with --enable-hierarchical-kv: a prefix evicted from the
device pool comes back from each tier (host, disk, S3 on SeaweedFS) with greedy output
identical to transformers; corrupt tier objects mean recompute; restarts and other
instances hit what was written; concurrent requests stay exact.

float32 throughout (see test_server.py). The device pool is tiny (--max-total-tokens) so
the filler prompts evict the context.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from tiers_common import (
    FILLERS,
    FROM_TIER,
    MAX_NEW,
    PROMPTS,
    ask,
    evict_context,
    metric,
    seaweed_env,
    tier_args,
    tier_server,
)

from sgl_kvext.seaweedfs import SeaweedFS

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def expected(hf_greedy: Callable[..., list[list[int]]]) -> list[list[int]]:
    return hf_greedy(PROMPTS, MAX_NEW)


@pytest.mark.parametrize("tier", ["host", "disk", "s3"])
def test_evicted_prefix_comes_back_exact(tier: str, model_path: Path, log_dir: Path,
                                         tmp_path: Path, seaweed: SeaweedFS,
                                         expected: list[list[int]]) -> None:
    with tier_server(model_path, log_dir, tier, "--enable-metrics",
                 *tier_args(tier, tmp_path, seaweed), env=seaweed_env(seaweed)) as server:
        first = ask(server, 0)
        evict_context(server)
        second = ask(server, 1)
        time.sleep(2.5)                            # the exporter copies counters every second
        metrics = server.get_text("/metrics")
        log = server.log_path.read_text()
    assert first.output_ids == expected[0]
    assert second.output_ids == expected[1]
    assert second.cached_tokens >= FROM_TIER, second
    assert "sgl-kvext: HierarchicalRadixCache active" in log
    assert metric(metrics, "kvext_loaded_pages_total") >= FROM_TIER // 32
    assert metric(metrics, "kvext_tier_hits_total", tier) > 0     # served from this tier
    if tier != "host":
        assert metric(metrics, "kvext_prefetch_promoted_pages_total") > 0


def test_corrupt_disk_objects_mean_recompute(model_path: Path, log_dir: Path, tmp_path: Path,
                                             expected: list[list[int]]) -> None:
    disk = tmp_path / "disk"
    args = ["--kvext-host-size", "40MiB", "--kvext-disk-dir", str(disk)]
    with tier_server(model_path, log_dir, "corrupt", *args) as server:
        assert ask(server, 0).output_ids == expected[0]
        evict_context(server)
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


def test_concurrent_requests_while_the_prefix_is_evicted(model_path: Path, log_dir: Path,
                                                         expected: list[list[int]]) -> None:
    with tier_server(model_path, log_dir, "concurrent", "--kvext-host-size", "512MiB") as server:
        assert ask(server, 0).output_ids == expected[0]
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            fillers = [pool.submit(server.generate, f, 2) for f in FILLERS]
            asks = [pool.submit(ask, server, i) for i in (0, 1)]
            results = [a.result(timeout=600) for a in asks]
            for f in fillers:
                f.result(timeout=600)
        again = ask(server, 1)
    assert [r.output_ids for r in results] == expected
    assert again.output_ids == expected[1]
    assert json.dumps([r.cached_tokens for r in results])
