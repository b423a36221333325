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

from sgl_kvext.demo import build_context
from sgl_kvext.seaweedfs import SeaweedFS
from sgl_kvext.server import Completion, SGLangServer

pytestmark = pytest.mark.server

CONTEXT, QUESTIONS = build_context(24, seed=11)          # ~560 tokens
PROMPTS = [CONTEXT + q + "\nAnswer: the depot shipped" for q in QUESTIONS[:2]]
FILLERS = [build_context(45, seed=s)[0] + "Total crates:" for s in (21, 22, 23)]
MAX_NEW = 12
BASE = ["--dtype", "float32", "--max-total-tokens", "1400", "--kvext-page-tokens", "32",
        "--enable-hierarchical-kv"]
FROM_TIER = 400      # tokens the second request must get from a tier (the device keeps ~22)


@pytest.fixture(scope="module")
def expected(hf_greedy: Callable[..., list[list[int]]]) -> list[list[int]]:
    return hf_greedy(PROMPTS, MAX_NEW)


def _server(model_path: Path, log_dir: Path, name: str, *args: str,
            env: dict[str, str] | None = None) -> SGLangServer:
    return SGLangServer(model_path, [*BASE, *args], log_path=log_dir / f"{name}.log", env=env)


def _evict_context(server: SGLangServer) -> None:
    for filler in FILLERS:
        server.generate(filler, max_new_tokens=2)


def _ask(server: SGLangServer, i: int) -> Completion:
    return server.generate(PROMPTS[i], max_new_tokens=MAX_NEW)


def _seaweed_env(seaweed: SeaweedFS) -> dict[str, str]:
    creds = seaweed.credentials
    return {"AWS_ACCESS_KEY_ID": creds["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": creds["aws_secret_access_key"]}


def _tier_args(tier: str, tmp_path: Path, seaweed: SeaweedFS) -> list[str]:
    if tier == "host":
        return ["--kvext-host-size", "512MiB"]
    small_host = ["--kvext-host-size", "40MiB"]   # holds the context; fillers push it out
    if tier == "disk":
        return [*small_host, "--kvext-disk-dir", str(tmp_path / "disk"), "--kvext-disk-size",
                "1GiB"]
    return [*small_host, "--kvext-s3-url", f"s3://kvext-e2e/{uuid.uuid4().hex}",
            "--kvext-s3-endpoint", seaweed.endpoint]


def _metric(text: str, name: str, tier: str | None = None) -> float:
    """Sum of a /metrics sample over its labels (optionally one tier)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and (tier is None or f'tier="{tier}"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("tier", ["host", "disk", "s3"])
def test_evicted_prefix_comes_back_exact(tier: str, model_path: Path, log_dir: Path,
                                         tmp_path: Path, seaweed: SeaweedFS,
                                         expected: list[list[int]]) -> None:
    with _server(model_path, log_dir, tier, "--enable-metrics",
                 *_tier_args(tier, tmp_path, seaweed), env=_seaweed_env(seaweed)) as server:
        first = _ask(server, 0)
        _evict_context(server)
        second = _ask(server, 1)
        time.sleep(2.5)                            # the exporter copies counters every second
        metrics = server.get_text("/metrics")
        log = server.log_path.read_text()
    assert first.output_ids == expected[0]
    assert second.output_ids == expected[1]
    assert second.cached_tokens >= FROM_TIER, second
    assert "sgl-kvext: HierarchicalRadixCache active" in log
    assert _metric(metrics, "kvext_loaded_pages_total") >= FROM_TIER // 32
    assert _metric(metrics, "kvext_tier_hits_total", tier) > 0     # served from this tier
    if tier != "host":
        assert _metric(metrics, "kvext_prefetch_promoted_pages_total") > 0


def test_corrupt_disk_objects_mean_recompute(model_path: Path, log_dir: Path, tmp_path: Path,
                                             expected: list[list[int]]) -> None:
    disk = tmp_path / "disk"
    args = ["--kvext-host-size", "40MiB", "--kvext-disk-dir", str(disk)]
    with _server(model_path, log_dir, "corrupt", *args) as server:
        assert _ask(server, 0).output_ids == expected[0]
        _evict_context(server)
        objects = sorted((disk / "objects").rglob("*.kvx"))
        assert objects
        for path in objects:                       # flip a byte in every stored page
            blob = bytearray(path.read_bytes())
            blob[len(blob) // 2] ^= 0x20
            path.write_bytes(bytes(blob))
        second = _ask(server, 1)
    assert second.output_ids == expected[1]
    assert second.cached_tokens < FROM_TIER        # nothing corrupt was served
    assert any((disk / "quarantine").iterdir())


def test_restart_and_second_instance_hit(model_path: Path, log_dir: Path, tmp_path: Path,
                                         seaweed: SeaweedFS, expected: list[list[int]]) -> None:
    disk = tmp_path / "shared-disk"
    s3_url = f"s3://kvext-e2e/{uuid.uuid4().hex}"
    env = _seaweed_env(seaweed)
    with _server(model_path, log_dir, "writer", "--kvext-disk-dir", str(disk),
                 "--kvext-s3-url", s3_url, "--kvext-s3-endpoint", seaweed.endpoint,
                 env=env) as writer:
        assert _ask(writer, 0).output_ids == expected[0]
        # A second instance, running at the same time, shares only the S3 prefix.
        with _server(model_path, log_dir, "reader", "--kvext-s3-url", s3_url,
                     "--kvext-s3-endpoint", seaweed.endpoint, env=env) as reader:
            shared = _ask(reader, 1)
    assert shared.output_ids == expected[1] and shared.cached_tokens >= FROM_TIER
    # A restart on the same disk folder (no S3) warm-starts from it.
    with _server(model_path, log_dir, "restart", "--kvext-disk-dir", str(disk)) as restarted:
        warm = _ask(restarted, 1)
    assert warm.output_ids == expected[1] and warm.cached_tokens >= FROM_TIER


def test_concurrent_requests_while_the_prefix_is_evicted(model_path: Path, log_dir: Path,
                                                         expected: list[list[int]]) -> None:
    with _server(model_path, log_dir, "concurrent", "--kvext-host-size", "512MiB") as server:
        assert _ask(server, 0).output_ids == expected[0]
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            fillers = [pool.submit(server.generate, f, 2) for f in FILLERS]
            asks = [pool.submit(_ask, server, i) for i in (0, 1)]
            results = [a.result(timeout=600) for a in asks]
            for f in fillers:
                f.result(timeout=600)
        again = _ask(server, 1)
    assert [r.output_ids for r in results] == expected
    assert again.output_ids == expected[1]
    assert json.dumps([r.cached_tokens for r in results])
