"""S3 tier against a real SeaweedFS on loopback: contract, corruption, outages, sharing."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import boto3
import pytest
from helpers import run_python
from tier_contract import TierContract, assert_same, key_of, page_of

from sgl_kvext.harness.seaweedfs import SeaweedFS
from sgl_kvext.tiers.breaker import BreakerState, CircuitBreaker
from sgl_kvext.tiers.s3 import TURN_EVENTS as S3_TURN_EVENTS
from sgl_kvext.tiers.s3 import S3Tier

NS = bytes(range(32))


def make_s3(server: SeaweedFS, prefix: str | None = None, ns: bytes = NS, **kw: object) -> S3Tier:
    url = f"s3://kvext-test/{prefix or uuid.uuid4().hex}"
    return S3Tier(url, ns, endpoint=server.endpoint, credentials=server.credentials,
                  **kw)  # type: ignore[arg-type]


class TestS3TierContract(TierContract):
    @pytest.fixture(autouse=True)
    def _server(self, seaweed: SeaweedFS) -> None:
        self.server = seaweed

    def make_tier(self, capacity: int) -> S3Tier:
        return make_s3(self.server)


def test_multipart_object_round_trips(seaweed: SeaweedFS) -> None:
    tier = make_s3(seaweed, multipart_threshold=5 << 20, codec="none")
    big = page_of(1, (12 << 20) + 3, "uint8")
    assert tier.put([big]).stored == (big.key,)
    assert_same(tier.get([big.key])[big.key], big)
    tier.close()


def test_corrupt_object_is_a_miss_and_quarantined(seaweed: SeaweedFS) -> None:
    prefix = uuid.uuid4().hex
    tier = make_s3(seaweed, prefix)
    tier.put([page_of(1), page_of(2)])
    raw = boto3.client("s3", endpoint_url=seaweed.endpoint, region_name="us-east-1",
                       **seaweed.credentials)
    name = tier._object_key(key_of(1))
    blob = bytearray(raw.get_object(Bucket="kvext-test", Key=name)["Body"].read())
    blob[-5] ^= 0x10
    raw.put_object(Bucket="kvext-test", Key=name, Body=bytes(blob))
    assert tier.get([key_of(1), key_of(2)]).keys() == {key_of(2)}
    assert tier.stats()["quarantined"] == 1
    listed = raw.list_objects_v2(Bucket="kvext-test", Prefix=f"{prefix}/quarantine/")
    assert listed.get("KeyCount", 0) == 1
    assert tier.exists([key_of(1)]) == [False]
    tier.close()


def test_namespaces_and_prefixes_are_isolated(seaweed: SeaweedFS) -> None:
    prefix = uuid.uuid4().hex
    a, b = make_s3(seaweed, prefix), make_s3(seaweed, prefix, ns=bytes(32))
    a.put([page_of(1)])
    assert b.get([key_of(1)]) == {} and a.get([key_of(1)]).keys() == {key_of(1)}
    a.close()
    b.close()


def test_another_process_shares_hits(seaweed: SeaweedFS) -> None:
    prefix = uuid.uuid4().hex
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from sgl_kvext.tiers.s3 import TURN_EVENTS as S3_TURN_EVENTS
from sgl_kvext.tiers.s3 import S3Tier
from tier_contract import page_of
tier = S3Tier("s3://kvext-test/{prefix}", bytes(range(32)), endpoint={seaweed.endpoint!r},
              credentials={seaweed.credentials!r})
print(len(tier.put([page_of(i) for i in range(5)]).stored))
"""
    result = run_python(code, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "5", result.stderr[-2000:]
    tier = make_s3(seaweed, prefix)
    got = tier.get([key_of(i) for i in range(6)])
    assert got.keys() == {key_of(i) for i in range(5)}
    for i in range(5):
        assert_same(got[key_of(i)], page_of(i))
    tier.close()


@pytest.fixture
def own_seaweed(tmp_path: Path):  # type: ignore[no-untyped-def]
    server = SeaweedFS(tmp_path / "data", log_path=tmp_path / "weed.log").start()
    yield server
    server.stop()


def _timed(fn):  # type: ignore[no-untyped-def]
    start = time.monotonic()
    out = fn()
    return out, time.monotonic() - start


def test_killed_server_gives_fast_misses_then_recovers(own_seaweed: SeaweedFS) -> None:
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=0.5, max_cooldown_s=1.0)
    tier = make_s3(own_seaweed, op_timeout_s=3.0, read_timeout_s=1.0, breaker=breaker)
    pages = [page_of(i) for i in range(4)]
    assert len(tier.put(pages).stored) == 4
    own_seaweed.stop()
    got, took = _timed(lambda: tier.get([p.key for p in pages]))
    assert got == {} and took < 3.5
    assert breaker.state is not BreakerState.CLOSED
    (held, took) = _timed(lambda: tier.exists([p.key for p in pages]))
    assert held == [False] * 4 and took < 1.0          # breaker open: no 3 s network wait
    assert tier.put([page_of(9)]).rejected == (key_of(9),)
    own_seaweed.start()                                 # same ports, same data folder
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:                 # the get that finds all 4 counts
        got = tier.get([p.key for p in pages])
        if len(got) == 4:
            break
        time.sleep(0.3)
    assert got.keys() == {p.key for p in pages}
    assert breaker.state is BreakerState.CLOSED
    tier.close()


def test_stalled_server_is_bounded_by_the_operation_timeout(own_seaweed: SeaweedFS) -> None:
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=30.0, max_cooldown_s=30.0)
    tier = make_s3(own_seaweed, op_timeout_s=1.5, read_timeout_s=1.0, retries=0,
                   breaker=breaker)
    tier.put([page_of(1)])
    own_seaweed.pause()
    try:
        got, took = _timed(lambda: tier.get([key_of(1), key_of(2)]))
        assert got == {} and took < 2.5
        time.sleep(1.0)                                 # let the stalled calls fail
        got, took = _timed(lambda: tier.get([key_of(1)]))
        assert got == {} and took < 1.0 and breaker.state is BreakerState.OPEN   # not 1.5 s
        assert json.dumps(tier.stats())                 # counters stay plain data
    finally:
        own_seaweed.resume()
    tier.close()


def test_a_probe_that_raises_anything_reopens_the_breaker_never_sticks(
        seaweed: SeaweedFS) -> None:
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=0.2, max_cooldown_s=0.4)
    tier = make_s3(seaweed, breaker=breaker)
    tier.put([page_of(1)])
    real = tier._client.get_object

    def fake_raising_get_object(**kw: object) -> object:  # no real S3 raises this
        raise RuntimeError("an error botocore does not wrap")

    tier._client.get_object = fake_raising_get_object  # type: ignore[method-assign]
    assert tier.get([key_of(1)]) == {}                  # a miss, not an exception
    assert breaker.state is BreakerState.OPEN
    time.sleep(0.25)
    assert tier.get([key_of(1)]) == {}                  # the probe raises: open again
    assert breaker.state is BreakerState.OPEN
    tier._client.get_object = real  # type: ignore[method-assign]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and key_of(1) not in tier.get([key_of(1)]):
        time.sleep(0.1)
    assert breaker.state is BreakerState.CLOSED
    tier.close()


def test_quarantine_copies_are_bounded(seaweed: SeaweedFS,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from sgl_kvext.tiers import s3

    monkeypatch.setattr(s3, "QUARANTINE_KEEP", 2)
    prefix = uuid.uuid4().hex
    tier = make_s3(seaweed, prefix)
    pages = [page_of(i) for i in range(5)]
    tier.put(pages)
    raw = boto3.client("s3", endpoint_url=seaweed.endpoint, region_name="us-east-1",
                       **seaweed.credentials)
    for p in pages:
        raw.put_object(Bucket="kvext-test", Key=tier._object_key(p.key), Body=b"damaged")
    assert tier.get([p.key for p in pages]) == {}
    assert tier.stats()["quarantined"] == 5 and tier.exists([p.key for p in pages]) == [False] * 5
    listed = raw.list_objects_v2(Bucket="kvext-test", Prefix=f"{prefix}/quarantine/")
    assert listed.get("KeyCount", 0) == 2
    tier.close()


def test_a_slow_but_answering_s3_trips_the_breaker_and_its_backlog_is_bounded(
        own_seaweed: SeaweedFS) -> None:
    prefix = uuid.uuid4().hex
    writer = make_s3(own_seaweed, prefix)                      # written at normal speed
    writer.put([page_of(i) for i in range(8)])
    writer.close()
    quiet = CircuitBreaker(failure_threshold=1000, cooldown_s=30.0, max_cooldown_s=30.0)
    tier = make_s3(own_seaweed, prefix, op_timeout_s=0.3, read_timeout_s=10.0, retries=0,
                   breaker=quiet, connections=2)               # at most 8 calls in flight
    keys = [p.key for p in [page_of(i) for i in range(8)]]
    assert tier.stats()["shed"] == 0
    own_seaweed.pause()                                        # answers, but only later
    try:
        assert tier.get(keys) == {}                            # 8 calls left running
        got, took = _timed(lambda: tier.get(keys[:1]))
        assert got == {} and took < 0.3 and tier.stats()["shed"] == 1   # shed, not waited
    finally:
        own_seaweed.resume()
    # The backlog drains: a get then finds all 8 (asked until one does: on a loaded machine
    # any one call may pass the 0.3 s timeout; a second, separate get failed a CI run so).
    deadline, got = time.monotonic() + 30, {}
    while time.monotonic() < deadline:
        got = tier.get(keys)
        if len(got) == 8:
            break
        time.sleep(0.2)
    assert len(got) == 8
    tier.close()
    slow = CircuitBreaker(failure_threshold=2, cooldown_s=30.0, max_cooldown_s=30.0)
    tier = make_s3(own_seaweed, prefix, op_timeout_s=0.3, read_timeout_s=10.0, retries=0,
                   breaker=slow)
    own_seaweed.pause()
    try:
        for _ in range(2):                 # each call would succeed, only too late
            assert tier.get(keys[:1]) == {}
        assert slow.state is BreakerState.OPEN
    finally:
        own_seaweed.resume()
    tier.close()


def test_a_put_uploads_at_most_write_calls_pages_at_once(seaweed: SeaweedFS) -> None:
    """Every S3 call holds the GIL the scheduler thread needs for parts of its work, so a put
    (a background write) keeps few in flight; all its pages are still stored."""
    tier = make_s3(seaweed, write_calls=2)
    upload, lock, now, most = tier._put_one, threading.Lock(), [0], [0]

    def counted(page):  # type: ignore[no-untyped-def]
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        try:
            time.sleep(0.05)              # a slow round trip: the calls would overlap
            return upload(page)
        finally:
            with lock:
                now[0] -= 1

    tier._put_one = counted  # type: ignore[method-assign]
    pages = [page_of(i) for i in range(7)]
    assert set(tier.put(pages).stored) == {p.key for p in pages}
    assert most[0] == 2
    assert len(tier.get([p.key for p in pages])) == 7
    with pytest.raises(ValueError, match="write_calls must be >= 1"):
        make_s3(seaweed, write_calls=0)
    tier.close()


def test_a_background_request_yields_between_its_phases_the_scheduler_never_does(
        seaweed: SeaweedFS) -> None:
    """boto3 is Python under the GIL the scheduler thread needs between forwards: a request
    for a background caller (a writer, the prefetcher) waits at the scheduler's gate before
    each phase (parameters, signing, sending, parsing), one the scheduler makes never."""
    from sgl_kvext import scheduler_turn

    gate = scheduler_turn.GATE
    tier = make_s3(seaweed, write_calls=1)
    page = page_of(1)
    try:
        gate.around_run_batch(lambda s: None, None)           # this thread is the scheduler
        before = gate.waits
        assert tier.get([page.key]) == {}                     # the scheduler's own read
        assert gate.waits == before
        writer = threading.Thread(target=tier.put, args=([page],))
        writer.start()
        writer.join(timeout=30)
        # the caller once, then a HEAD and a PUT, each past every phase
        assert gate.waits - before >= 1 + 2 * len(S3_TURN_EVENTS)
        gate.around_on_idle(lambda s: None, None)
        assert page.key in tier.get([page.key])               # the write went through
    finally:
        gate.around_on_idle(lambda s: None, None)             # open again for other tests
        tier.close()
