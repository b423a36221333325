"""Host tier: the contract, each eviction policy, and policy behaviour."""

from __future__ import annotations

import pytest
from tier_contract import PAGE, BoundedTierContract, key_of, page_of

from sgl_kvext.tiers.host import HostTier
from sgl_kvext.tiers.policies import POLICIES, LFUPolicy, LRUPolicy, S3FIFOPolicy, make_policy


@pytest.mark.parametrize("policy", sorted(POLICIES))
class TestHostTierContract(BoundedTierContract):
    @pytest.fixture(autouse=True)
    def _policy(self, policy: str) -> None:
        self.policy = policy

    def make_tier(self, capacity: int) -> HostTier:
        return HostTier(capacity, self.policy, block_bytes=8192)


def test_lru_evicts_least_recently_used() -> None:
    tier = HostTier(3 * PAGE + 3 * 8192, "lru", block_bytes=8192)
    tier.put([page_of(i) for i in range(3)])
    tier.get([key_of(0)])                       # 0 is now the most recent
    evicted = tier.put([page_of(3)]).evicted
    assert [p.key for p in evicted] == [key_of(1)]


def test_lfu_evicts_least_frequently_used() -> None:
    tier = HostTier(3 * PAGE + 3 * 8192, "lfu", block_bytes=8192)
    tier.put([page_of(i) for i in range(3)])
    for _ in range(3):
        tier.get([key_of(0), key_of(2)])
    evicted = tier.put([page_of(3)]).evicted
    assert [p.key for p in evicted] == [key_of(1)]


def test_s3fifo_keeps_a_hot_key_through_a_scan() -> None:
    policy = S3FIFOPolicy()
    hot = b"hot"
    policy.admit(hot)
    policy.touch(hot)
    victims = []
    for i in range(50):                          # a one-pass scan of cold keys
        key = f"cold{i}".encode()
        policy.admit(key)
        policy.touch(hot)
        if len(policy) > 8:
            victims.append(policy.victim())
    assert hot not in victims and len(policy) == 8


def test_s3fifo_ghost_readmits_to_main() -> None:
    policy = S3FIFOPolicy()
    for i in range(20):
        policy.admit(bytes([i]))
    first = policy.victim()                      # evicted from the small queue, remembered
    policy.admit(first)
    assert first in policy._main


@pytest.mark.parametrize("cls", [LRUPolicy, LFUPolicy, S3FIFOPolicy])
def test_policy_tracks_exactly_admitted_keys(cls: type) -> None:
    policy = cls()
    keys = [bytes([i]) for i in range(30)]
    for k in keys:
        policy.admit(k)
    policy.remove(keys[5])
    policy.remove(b"never")
    out = {policy.victim() for _ in range(29)}
    assert out == set(keys) - {keys[5]} and len(policy) == 0
    with pytest.raises(LookupError):
        policy.victim()


def test_unknown_policy_lists_choices() -> None:
    with pytest.raises(ValueError, match="lru, lfu, s3fifo"):
        make_policy("mru")


def test_the_pool_reports_when_its_memory_is_faulted_in() -> None:
    tier = HostTier(64 << 20, block_bytes=1 << 20)
    assert tier.wait_populated(30)
    assert HostTier(0).wait_populated(0)               # nothing to fault in
