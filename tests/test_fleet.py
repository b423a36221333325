"""Two `--enable-hierarchical-kv` servers sharing one S3 prefix (a real SeaweedFS) behind
SGLang's router (`sglang-router`), on loopback: a history computed on one instance is served
on the other from S3, through the router, and its KV is the same (the answer is token-equal
to transformers); after one instance is killed, the router sends every request to the
survivor once its health check marks the dead one down, and none fails; /kvext/lookup
tells which instance holds a prompt where. float32 throughout
(see test_server.py)."""

from __future__ import annotations

import contextlib
import time
import urllib.error
from collections.abc import Callable
from pathlib import Path

import pytest
from tiers_common import (
    BASE,
    CONTEXT,
    FILLERS,
    MAX_NEW,
    METRICS_WAIT_S,
    PROMPTS,
    metric,
    s3_args,
    seaweed_env,
)

from sgl_kvext.harness.fleet import Fleet
from sgl_kvext.harness.seaweedfs import SeaweedFS
from sgl_kvext.harness.server import Endpoint, free_port
from sgl_kvext.harness.tier_router import TierAwareRouter

pytestmark = pytest.mark.e2e


def _s3(fleet: Fleet, name: str) -> list[float]:
    """A tier counter of the S3 tier, per server."""
    return [metric(s.get_text("/metrics"), f"kvext_tier_{name}_total", "s3")
            for s in fleet.servers]


def test_history_is_shared_through_s3_and_survives_losing_an_instance(
        model_path: Path, log_dir: Path, seaweed: SeaweedFS,
        hf_greedy: Callable[..., list[list[int]]], n_tokens: Callable[[str], int]) -> None:
    expected = hf_greedy(PROMPTS[:2], MAX_NEW)
    args = [*BASE, "--enable-metrics", "--kvext-host-size", "64MiB", *s3_args(seaweed)]
    with contextlib.ExitStack() as stack:
        fleet = stack.enter_context(Fleet(model_path, 2, args, log_dir=log_dir / "fleet",
                                          policy="round_robin", env=seaweed_env(seaweed)))
        first = fleet.router.generate(PROMPTS[0], MAX_NEW)
        # Write-through to S3 runs in the background, a page at a time: wait until S3 holds
        # the whole prompt as the other instance sees it (its first pages land first).
        deadline = time.monotonic() + 60
        while True:
            looked = [s.post("/kvext/lookup", {"text": PROMPTS[0]}) for s in fleet.servers]
            if min(r["tiers"]["s3"] for r in looked) >= 0.9 * looked[0]["tokens"] - 32 \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        with pytest.raises(urllib.error.HTTPError) as bad:
            fleet.servers[0].post("/kvext/lookup", {"input_ids": ["x"]})
        with pytest.raises(urllib.error.HTTPError) as bad_remote:
            fleet.servers[0].post("/kvext/lookup", {"text": "x", "remote": "no"})
        local_only = [s.post("/kvext/lookup", {"text": PROMPTS[0], "remote": False})
                      for s in fleet.servers]
        second = fleet.router.generate(PROMPTS[1], MAX_NEW)     # round robin: the other one
        time.sleep(METRICS_WAIT_S)                # the exporter's copies (BASE)
        hits = _s3(fleet, "hits")
        # The tier-aware router in front of the same two: a new context's second question
        # goes where its first was answered (round robin would alternate).
        tiered = TierAwareRouter([s.url for s in fleet.servers], free_port()).start()
        stack.callback(tiered.stop)
        routed = Endpoint(tiered.url)
        fresh = [FILLERS[0] + f" Question {i}:" for i in (1, 2)]
        placed = [routed.generate(p, MAX_NEW) for p in fresh]
        holders = [s.post("/kvext/lookup", {"text": FILLERS[0]})["device"]
                   for s in fleet.servers]
        fleet.servers[0].kill()                   # SIGKILL: a crash
        deadline = time.monotonic() + 30
        while fleet.healthy_workers() != 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert fleet.healthy_workers() == 1
        after = [fleet.router.generate(p, MAX_NEW) for p in (*PROMPTS[:2], PROMPTS[0])]
        # The tier-aware router ranks the dead one last (its lookup fails): nothing fails.
        survived = [routed.generate(p, MAX_NEW) for p in fresh]
        counts = tiered.counts
    assert first.output_ids == expected[0] and second.output_ids == expected[1]
    assert first.cached_tokens < 0.1 * first.prompt_tokens
    # Only an instance that had never seen the context reads it from S3 (a repeat on the same
    # one is a device hit): one of them did, for nearly all of the shared history.
    assert sorted(h > 0 for h in hits) == [False, True], hits
    assert second.cached_tokens >= 0.9 * n_tokens(CONTEXT), second
    # ... and its response says where from: S3 (read ahead for it), split to the token
    load = second.meta["kvext_load"][0]
    assert load.get("s3", 0) >= 0.8 * n_tokens(CONTEXT), load
    assert sum(load.values()) == second.cached_tokens, (load, second.cached_tokens)
    # /kvext/lookup: the instance that computed the prompt holds it on device (and in S3);
    # the other holds nothing locally and would serve it from S3.
    owner, other = sorted(looked, key=lambda r: -r["device"])
    prompt = owner["tokens"]
    assert owner["device"] >= 0.9 * prompt and owner["cached"] >= owner["device"]
    assert other["device"] == 0 and other["tiers"]["host"] == 0
    assert other["tiers"]["s3"] >= 0.9 * prompt - 32 and other["cached"] == other["tiers"]["s3"]
    assert bad.value.code == 400 and "input_ids" in bad.value.read().decode()
    assert bad_remote.value.code == 400 and "remote" in bad_remote.value.read().decode()
    # Without the remote tiers: the same device and local figures, no S3, nothing cached
    # on the instance that holds it only in S3.
    by_device = sorted(local_only, key=lambda r: -r["device"])
    assert "s3" not in by_device[0]["tiers"] and "s3" not in by_device[1]["tiers"]
    assert by_device[0]["cached"] >= by_device[0]["device"] >= 0.9 * prompt
    assert by_device[1]["cached"] == 0
    # The survivor serves every user (no request failed: generate raises on any error), the
    # shared history cached for each (its own device, or S3 for what the dead one wrote).
    assert [a.output_ids for a in after] == [expected[0], expected[1], expected[0]]
    assert all(a.cached_tokens >= 0.9 * n_tokens(CONTEXT) for a in after), after
    # Tier-aware: the second question was a device hit on the server that answered the
    # first, and only that one holds the context on device.
    filler = n_tokens(FILLERS[0])
    assert placed[1].cached_tokens >= 0.9 * filler, placed
    assert sorted(h >= 0.9 * filler for h in holders) == [False, True], holders
    assert len(survived) == 2 and counts["by_lookup"] == 4, counts
