"""sgl-kvext-bench fleet: how an arm's requests are summarized, and its options (the run
itself starts fleets: docs/benchmarks.md has it)."""

import pytest

from sgl_kvext_bench.cli import main
from sgl_kvext_bench.fleet import Request, _sources, short_failovers, summarize


def _req(turn: int, phase: str, ttft: float, prompt: int, cached: int, ok: bool = True,
         user: int = 0) -> Request:
    return Request("cache_aware", user, turn, phase, ok, ttft, prompt, cached)


def test_hit_rate_and_ttft_count_answered_requests_and_split_at_the_restart() -> None:
    out = summarize([_req(1, "before", 2.0, 400, 0), _req(2, "before", 0.2, 500, 400),
                     _req(3, "failover", 0.5, 600, 450), _req(3, "failover", 0, 0, 0, ok=False),
                     _req(4, "after", 0.3, 700, 600), _req(5, "after", 0.1, 800, 750)])
    assert out["requests_sent"] == 6 and out["failed"] == 1
    assert out["hit_rate"] == pytest.approx(2200 / 3000)
    assert out["hit_rate_after_restart"] == pytest.approx(1350 / 1500)
    assert out["ttft_p50_s"] == 0.3 and out["ttft_p90_s"] == 2.0
    assert out["ttft_p50_after_restart_s"] == pytest.approx(0.2)
    assert out["ttft_p50_failover_s"] == 0.5
    assert out["ttft_p50_first_after_restart_s"] == 0.3
    assert out["failover_recomputed_users"] == 1        # 450 < the 480 of 500 in whole pages


def test_a_failover_turn_short_of_the_previous_prompts_pages_counts_as_recomputed() -> None:
    requests = [_req(2, "before", 0.2, 500, 400, user=0), _req(2, "before", 0.2, 530, 0, user=1),
                _req(3, "failover", 0.5, 600, 480, user=0),     # every whole page of 500
                _req(3, "failover", 0.5, 650, 352, user=1)]     # 352 < 512: recomputed
    assert short_failovers(requests, 32) == 1
    assert short_failovers(requests[:2] + [requests[3]], 32) == 1
    assert short_failovers([requests[2]], 32) == 0              # no previous turn known


def test_cached_tokens_are_split_by_where_each_response_says_they_came_from() -> None:
    meta = {"kvext_load": [{"device": 64, "host": 32, "s3": 320}], "cached_tokens": 416}
    assert _sources(meta) == {"device_tokens": 64, "host_tokens": 32, "disk_tokens": 0,
                              "s3_tokens": 320}
    assert _sources({}) == {"device_tokens": 0, "host_tokens": 0, "disk_tokens": 0,
                            "s3_tokens": 0}
    requests = [Request("tier_aware", 0, 2, "before", True, 0.2, 500, 480, 480),
                Request("tier_aware", 0, 3, "failover", True, 0.3, 600, 480, 0, 0, 0, 480),
                Request("tier_aware", 0, 4, "after", True, 0.2, 700, 600, 64, 536),
                Request("tier_aware", 0, 5, "after", True, 0.2, 800, 700, 700),
                Request("tier_aware", 0, 6, "router_restart", True, 0.4, 900, 800, 0, 0, 0, 800)]
    out = summarize(requests)
    assert out["cached_by_source"] == pytest.approx(
        {"device": 1244 / 3500, "host": 536 / 3500, "disk": 0.0, "s3": 1280 / 3500})
    assert out["cached_by_source_router_restart"]["s3"] == pytest.approx(800 / 900)
    assert out["ttft_p50_router_restart_s"] == 0.4 and out["hit_rate_after_restart"] == 1300 / 1500
    assert out["cached_by_source_failover"]["s3"] == pytest.approx(0.8)
    assert out["cached_by_source_first_after_restart"] == pytest.approx(
        {"device": 64 / 700, "host": 536 / 700, "disk": 0.0, "s3": 0.0})


@pytest.mark.parametrize("argv, message", [
    (["--arms", "single,nope"], "--arms: unknown ['nope']"),
    (["--turns", "2"], "--turns must be >= 3"),
    (["--pool-fraction", "0"], "--pool-fraction in (0, 1]"),
    (["--users", "0"], "--users"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, argv, message) -> None:
    assert main(["fleet", "--json", str(tmp_path / "f.json"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
