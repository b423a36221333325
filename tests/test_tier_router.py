"""The tier-aware router's policy: what a lookup answer is worth, how servers are ranked, and
which requests are placed by lookup (the forwarding itself runs in tests/test_fleet.py)."""

import pytest

from sgl_kvext.harness.tier_router import (
    IN_FLIGHT_TOKENS,
    TIER_WEIGHTS,
    TierAwareRouter,
    lookup_body,
    rank,
    score,
)


def _answer(device: int, cached: int, **tiers: int) -> dict:
    return {"tokens": 1000, "page_tokens": 32, "device": device, "tiers": tiers,
            "cached": cached}


def test_each_cached_token_counts_at_the_fastest_tier_holding_it() -> None:
    assert score(_answer(0, 0, host=0, s3=0)) == 0
    assert score(_answer(960, 960, host=0, s3=640)) == 960          # device covers it all
    # device to 320, host to 640, s3 to 960: each stretch at its own tier's weight
    assert score(_answer(320, 960, host=640, s3=960)) == pytest.approx(
        320 + 320 * TIER_WEIGHTS["host"] + 320 * TIER_WEIGHTS["s3"])
    # a tier's run beyond what the server would serve (cached) does not count
    assert score(_answer(0, 320, s3=960)) == pytest.approx(320 * TIER_WEIGHTS["s3"])
    # the same tokens on device beat them in S3; an unknown tier counts like S3 or less
    assert score(_answer(640, 640)) > score(_answer(0, 640, s3=640))
    assert score(_answer(0, 640, nvme=640)) <= score(_answer(0, 640, host=640))


def test_servers_rank_by_score_less_running_requests_and_ties_rotate() -> None:
    assert rank([100.0, 900.0], [0, 0], start=0).order == (1, 0)
    # a request running on the better one costs it IN_FLIGHT_TOKENS
    busy = rank([IN_FLIGHT_TOKENS + 10.0, 0.0], [2, 0], start=0)
    assert busy.order == (1, 0) and busy.by_lookup
    # ties (nothing cached anywhere) go round robin with the start
    assert [rank([0.0, 0.0, 0.0], [0, 0, 0], start=s).order[0] for s in range(4)] == [0, 1, 2, 0]
    # a failed lookup ranks as holding nothing; none answering is not placement by lookup
    assert rank([None, 50.0], [0, 0], start=0).order == (1, 0)
    assert not rank([None, None], [0, 0], start=1).by_lookup


def test_only_single_prompt_requests_are_looked_up_with_their_tenant() -> None:
    local = {"remote": False}                   # S3 is shared: the same for every server
    assert lookup_body("/generate", {"text": "hi", "cache_salt": "t1"}) == {
        **local, "text": "hi", "cache_salt": "t1"}
    assert lookup_body("/generate", {"input_ids": [1, 2], "text": "ignored",
                                     "extra_key": "k"}) == {**local, "input_ids": [1, 2],
                                                            "extra_key": "k"}
    assert lookup_body("/v1/completions", {"prompt": "hi"}) == {**local, "text": "hi"}
    for path, body in [("/generate", {"text": ["a", "b"]}),     # a batch: no single prompt
                       ("/generate", {"text": ""}), ("/generate", {}),
                       ("/v1/completions", {"prompt": [[1], [2]]})]:
        assert lookup_body(path, body) is None, body


def test_a_router_needs_a_server() -> None:
    with pytest.raises(ValueError, match="at least one server"):
        TierAwareRouter([], 0)
