"""A fleet against one server (``sgl-kvext-bench fleet``): routing policies side by side.

The multi-turn chat workload (:mod:`sgl_kvext_bench.multiturn`, one request at a time) runs
on each arm in turn, every arm with its own S3 prefix on one SeaweedFS:

- ``single``: one ``--enable-hierarchical-kv`` server;
- ``round_robin``, ``cache_aware``: two such servers sharing the prefix behind SGLang's router
  with that policy (round robin is the worst case for locality);
- ``tier_aware``: the same two behind :class:`sgl_kvext.harness.tier_router.TierAwareRouter`
  (each request where ``/kvext/lookup`` finds most of its prompt).

Every server gets the multi-turn bench's device pool (a quarter of the working set), a 1 GiB
host tier and ``--kvext-prefetch-policy wait_complete`` (:data:`FLEET_FLAGS`). Halfway through,
the server that has processed most prompt tokens (the one holding most users; its index is
reported) is SIGKILLed: the arm waits until its router counts it down (the time is reported),
runs one turn on the survivor (the failover turn: its failed requests and TTFT), restarts the
killed server on its port (device tree and host tier empty, S3 still full) and runs the
remaining turns. ``single`` restarts its only server at the same point and runs the failover
turn on it. A fleet's last two turns: one sent straight to the servers, user ``u`` to server
``u % n`` (``spread``: users spread over the servers, as load balancing under concurrent
traffic would), then one after its router is restarted (``router_restart``: the servers keep
their KV, the router's state starts empty). Per arm: prompt tokens served from
cache (the hit rate), TTFT p50 / p90 over every turn and over the turns after the restart,
failed requests, the tokens each tier loaded (from the servers' ``/metrics``) and, per request,
where its cached tokens came from (device, host, disk, S3: each response's ``kvext_load``
report). A cross-instance probe measures the write-through delay (how long after a prompt is
answered on one server the other finds it in S3) and that server's TTFT then.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import urllib.error
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sgl_kvext.harness.demo import build_context
from sgl_kvext.harness.fleet import Fleet
from sgl_kvext.harness.seaweedfs import SeaweedFS
from sgl_kvext.harness.server import SGLangServer
from sgl_kvext_bench.client import kvext_counters, post_json, stream_generate
from sgl_kvext_bench.multiturn import Workload, percentile, working_set_tokens

ARMS = ("single", "round_robin", "cache_aware", "tier_aware")
#: Every arm's servers wait for the history S3 holds (docs/fleet.md): under the default
#: ``timeout`` policy a failover turn may recompute what loading would bring (1 user of 16 on
#: 2026-12-03); ``--server-args`` can override it (the last flag wins).
FLEET_FLAGS = ("--kvext-prefetch-policy", "wait_complete")
#: How long a router may take to count a killed server down, or a restarted one up.
SETTLE_S = 120.0


@dataclass(frozen=True)
class Request:
    arm: str
    user: int
    turn: int
    phase: str                  # before / failover / after (the restart) / spread / router_restart
    ok: bool
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int
    # where the cached tokens came from (the response's ``kvext_load`` report): the serving
    # instance's device and host memory, its disk, the shared S3
    device_tokens: int = 0
    host_tokens: int = 0
    disk_tokens: int = 0
    s3_tokens: int = 0


#: The sources a request's cached tokens are split into (``Request.<source>_tokens``).
SOURCES = ("device", "host", "disk", "s3")


def _sources(meta: Mapping[str, Any]) -> dict[str, int]:
    """``<source>_tokens`` of a response's ``kvext_load`` report (zeros without one)."""
    report = (meta.get("kvext_load") or [{}])[0]
    return {f"{name}_tokens": int(report.get(name, 0)) for name in SOURCES}


def _wait(what: str, ready: Callable[[], bool], timeout_s: float = SETTLE_S) -> float:
    """Seconds until ``ready()``; RuntimeError naming ``what`` after ``timeout_s``."""
    start = time.monotonic()
    while not ready():
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"fleet bench: {what} not within {timeout_s:.0f} s")
        time.sleep(0.25)
    return time.monotonic() - start


def _busiest(servers: Sequence[SGLangServer]) -> SGLangServer:
    """The server that has processed the most prompt tokens (SGLang's ``/metrics``)."""
    def prompt_tokens(server: SGLangServer) -> float:
        text = server.get_text("/metrics")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("sglang:prompt_tokens_total"))

    return max(servers, key=prompt_tokens)


def _tier_tokens(urls: Sequence[str], page_tokens: int) -> dict[str, float]:
    """Tokens each tier loaded on these servers so far (its hits are pages)."""
    time.sleep(1.5)                       # the servers copy their counters once a second
    out: dict[str, float] = {}
    for url in urls:
        for tier, counts in kvext_counters(url, settle_s=0).items():
            if "hits" in counts and tier in ("host", "disk", "s3"):
                out[tier] = out.get(tier, 0.0) + counts["hits"] * page_tokens
    return out


class _Arm:
    """One arm's servers: a fleet, or one server behind nothing."""

    def __init__(self, name: str, model_path: Path, args: Sequence[str], log_dir: Path,
                 env: dict[str, str]) -> None:
        self.name = name
        if name == "single":
            self.servers = [SGLangServer(model_path, args, log_path=log_dir / "single.log",
                                         env=env)]
            self.fleet: Fleet | None = None
        else:
            self.fleet = Fleet(model_path, 2, args, log_dir=log_dir / name, policy=name, env=env)
            self.servers = self.fleet.servers

    @property
    def url(self) -> str:
        return self.fleet.url if self.fleet is not None else self.servers[0].url

    def __enter__(self) -> _Arm:
        if self.fleet is not None:
            self.fleet.start()
        else:
            self.servers[0].start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fleet is not None:
            self.fleet.stop()
        else:
            self.servers[0].stop()


def run_arm(arm: _Arm, work: Workload, page_tokens: int,
            progress: Callable[[str], None]) -> dict[str, Any]:
    system, histories = work.system_prompt(), [""] * work.users
    requests: list[Request] = []
    killed_at = max(1, (work.turns - 1) // 2)
    stats: dict[str, Any] = {}

    def turn(t: int, phase: str, direct: bool = False) -> None:
        for user in range(work.users):
            question = work.question(user, t)
            # direct: user u to server u % n, past the router (users spread over the servers)
            url = arm.servers[user % len(arm.servers)].url if direct else arm.url
            try:
                r = stream_generate(url, system + histories[user] + question,
                                    work.answer_tokens, timeout_s=300)
            except (urllib.error.URLError, OSError, RuntimeError):
                requests.append(Request(arm.name, user, t, phase, False, 0.0, 0, 0))
                continue
            histories[user] += question + r.text + "\n"
            requests.append(Request(arm.name, user, t, phase, True, r.ttft_s, r.prompt_tokens,
                                    r.cached_tokens, **_sources(r.meta)))
            progress(f"fleet {arm.name}: turn {t} user {user + 1} ({phase}) ttft "
                     f"{r.ttft_s:.2f}s, {r.cached_tokens}/{r.prompt_tokens} cached")

    for t in range(1, killed_at + 1):
        turn(t, "before")
    victim = _busiest(arm.servers)     # the one holding most users: the failover that costs
    stats["killed"] = arm.servers.index(victim)
    loaded = _tier_tokens([victim.url], page_tokens)           # its counters die with it
    victim.kill()
    victim.stop()
    fleet = arm.fleet
    if fleet is not None:                   # the survivor serves the failover turn
        stats["mark_down_s"] = _wait("the router counting the killed server down",
                                     lambda: fleet.healthy_workers() == 1)
        turn(killed_at + 1, "failover")
    started = time.monotonic()
    victim.start()
    if fleet is not None:
        _wait("the router counting the restarted server up",
              lambda: fleet.healthy_workers() == len(fleet.servers))
    else:                                   # one server: its first turn after the restart
        turn(killed_at + 1, "failover")
    stats["restart_s"] = time.monotonic() - started
    # A fleet's last two turns: users spread over the servers (sent straight to server
    # u % n, as load balancing under concurrent traffic would place them), then the router
    # restarted (the servers keep their KV; the router's own state starts empty): where each
    # router sends a user whose history one server holds in memory and S3 holds for all.
    last = work.turns - 2 if fleet is not None and work.turns >= killed_at + 4 else work.turns
    for t in range(killed_at + 2, last + 1):
        turn(t, "after")
    if last < work.turns:
        assert fleet is not None
        turn(work.turns - 1, "spread", direct=True)
        started = time.monotonic()
        fleet.restart_router()
        stats["router_restart_s"] = time.monotonic() - started
        turn(work.turns, "router_restart")
    for tier, tokens in _tier_tokens([s.url for s in arm.servers], page_tokens).items():
        loaded[tier] = loaded.get(tier, 0.0) + tokens
    if arm.name == "tier_aware" and arm.fleet is not None:
        stats["router"] = arm.fleet.router.get("/kvext/router")
    return {"name": arm.name, **summarize(requests, page_tokens), **stats, "tier_tokens": loaded,
            "requests": [asdict(r) for r in requests]}


def short_failovers(requests: Sequence[Request], page_tokens: int) -> int:
    """Failover turns that found fewer cached tokens than the whole pages of the user's
    previous prompt (in sending order): history the survivor recomputed instead of loading."""
    previous: dict[int, int] = {}
    short = 0
    for r in requests:
        if r.ok and r.phase == "failover" and r.user in previous:
            short += r.cached_tokens < previous[r.user] // page_tokens * page_tokens
        if r.ok:
            previous[r.user] = r.prompt_tokens
    return short


def summarize(requests: Sequence[Request], page_tokens: int = 32) -> dict[str, Any]:
    """Hit rate and TTFT over all answered requests, and over those after the restart; the
    failover turns that recomputed history (:func:`short_failovers`)."""
    ok = [r for r in requests if r.ok]
    after = [r for r in ok if r.phase == "after"]
    first = min((r.turn for r in after), default=0)
    first_after = [r.ttft_s for r in after if r.turn == first]
    failover = [r.ttft_s for r in ok if r.phase == "failover"]

    def hit(rs: Sequence[Request]) -> float:
        return sum(r.cached_tokens for r in rs) / max(1, sum(r.prompt_tokens for r in rs))

    def by_source(rs: Sequence[Request]) -> dict[str, float]:
        prompt = max(1, sum(r.prompt_tokens for r in rs))
        return {name: sum(getattr(r, f"{name}_tokens") for r in rs) / prompt
                for name in SOURCES}

    ttft = [r.ttft_s for r in ok]
    first_turn = [r for r in after if r.turn == first]
    routed = [r for r in ok if r.phase == "router_restart"]
    return {"requests_sent": len(requests), "failed": len(requests) - len(ok),
            "hit_rate": hit(ok), "hit_rate_after_restart": hit(after),
            "ttft_p50_s": statistics.median(ttft) if ttft else None,
            "ttft_p90_s": percentile(ttft, 0.9) if ttft else None,
            "ttft_p50_after_restart_s": (statistics.median([r.ttft_s for r in after])
                                         if after else None),
            "ttft_p50_failover_s": statistics.median(failover) if failover else None,
            "failover_recomputed_users": short_failovers(requests, page_tokens),
            # the first turn with the restarted server back: where its users are sent now
            "ttft_p50_first_after_restart_s": (statistics.median(first_after)
                                               if first_after else None),
            # shares of prompt tokens by where they were cached (the rest was computed)
            "cached_by_source": by_source(ok),
            "cached_by_source_failover": by_source([r for r in ok if r.phase == "failover"]),
            "cached_by_source_first_after_restart": by_source(first_turn),
            "ttft_p50_router_restart_s": (statistics.median([r.ttft_s for r in routed])
                                          if routed else None),
            "hit_rate_router_restart": hit(routed),
            "cached_by_source_router_restart": by_source(routed)}


#: Contexts the cross-instance probe measures (their seeds); medians are reported.
PROBE_SEEDS = (31, 41, 51)


def cross_instance(fleet: Fleet, answer_tokens: int, pool_tokens: int) -> dict[str, Any]:
    """Per probe context (about half the device pool): answered on server 0, then asked on
    server 1 once S3 holds it there; the write-through delay and the TTFTs (cold, device hit
    on server 0, S3 hit on server 1, then a host-tier hit on server 0 once fillers pushed it
    out of its device pool). Medians over :data:`PROBE_SEEDS`, and each probe."""
    probes = [_probe(fleet, answer_tokens, pool_tokens, seed) for seed in PROBE_SEEDS]
    out: dict[str, Any] = {"probes": probes}
    for name in ("ttft_cold_s", "ttft_same_instance_s", "ttft_other_instance_s",
                 "ttft_host_hit_s", "other_instance_cached_share"):
        out[name] = statistics.median(p[name] for p in probes)
    delays = [p["write_through_delay_s"] for p in probes]
    out["write_through_delay_s"] = (statistics.median(delays) if None not in delays else None)
    return out


def _probe(fleet: Fleet, answer_tokens: int, pool_tokens: int, seed: int) -> dict[str, Any]:
    a, b = fleet.servers
    sentences = max(4, pool_tokens // 2 // 25)                     # ~25 tokens each
    context = build_context(sentences, seed=seed)[0]
    cold = stream_generate(a.url, context + "Question one?", answer_tokens)
    answered = time.monotonic()
    seen: list[dict[str, Any]] = []

    def in_s3() -> bool:
        seen.append(post_json(b.url, "/kvext/lookup", {"text": context}, timeout_s=30))
        return bool(seen[-1]["tiers"].get("s3", 0) >= 0.9 * seen[-1]["tokens"])

    delay: float | None
    try:
        _wait("S3", in_s3, timeout_s=60)
        delay = time.monotonic() - answered
    except RuntimeError:
        delay = None                      # reported as such, with what the lookup saw last
    again = stream_generate(a.url, context + "Question two?", answer_tokens)
    other = stream_generate(b.url, context + "Question three?", answer_tokens)
    for filler_seed in range(seed + 1, seed + 4):      # push it out of server 0's device pool
        filler = build_context(sentences, seed=filler_seed)[0]
        stream_generate(a.url, filler + "Go on.", 2)
    host = stream_generate(a.url, context + "Question four?", answer_tokens)
    return {"seed": seed, "prompt_tokens": other.prompt_tokens, "ttft_cold_s": cold.ttft_s,
            "ttft_same_instance_s": again.ttft_s, "ttft_other_instance_s": other.ttft_s,
            "other_instance_cached_tokens": other.cached_tokens,
            "other_instance_cached_share": other.cached_tokens / max(1, other.prompt_tokens),
            "ttft_host_hit_s": host.ttft_s, "host_hit_cached_tokens": host.cached_tokens,
            "host_hit_from_tier_tokens": host.host_cached_tokens,
            "write_through_delay_s": delay, "lookup": seen[-1]}


def run_fleet(model_path: Path, log_dir: Path, work: Workload, arms: Sequence[str],
              server_args: Sequence[str], page_tokens: int = 32, pool_fraction: float = 0.25,
              progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Every arm in turn (see the module doc); one SeaweedFS for all, a prefix per arm."""
    from transformers import AutoTokenizer

    if work.turns < 3:
        raise ValueError("the fleet bench needs at least 3 turns (before, failover, after)")
    total, longest = working_set_tokens(work, AutoTokenizer.from_pretrained(model_path))
    pool = max(int(total * pool_fraction), longest + 256)
    results: dict[str, Any] = {"workload": asdict(work), "working_set_tokens": total,
                               "pool_tokens": pool, "arms": []}
    # The S3 data (GBs) lives only as long as the run; its log stays beside the results.
    with tempfile.TemporaryDirectory(prefix="kvext-fleet-") as data, \
            SeaweedFS(Path(data), log_path=log_dir / "fleet-seaweed.log") as weed:
        env = {"AWS_ACCESS_KEY_ID": weed.credentials["aws_access_key_id"],
               "AWS_SECRET_ACCESS_KEY": weed.credentials["aws_secret_access_key"]}
        for name in arms:
            args = ["--enable-hierarchical-kv", "--enable-metrics",
                    "--kvext-page-tokens", str(page_tokens),
                    "--kvext-s3-url", f"s3://kvext-bench/{uuid.uuid4().hex[:12]}",
                    "--kvext-s3-endpoint", weed.endpoint, "--max-total-tokens", str(pool),
                    "--kvext-host-size", "1GiB", *FLEET_FLAGS, *server_args]
            with _Arm(name, model_path, args, log_dir, env) as arm:
                stream_generate(arm.url, "Hello", 1)                 # warm-up
                results["arms"].append(run_arm(arm, work, page_tokens, progress))
                if arm.fleet is not None and "cross_instance" not in results:
                    results["cross_instance"] = cross_instance(arm.fleet, work.answer_tokens,
                                                               pool)
    return results
