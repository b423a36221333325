"""The generic contract every Tier passes: subclass TierContract and define ``make_tier``.

A subclass's ``make_tier(capacity)`` returns a fresh, empty tier of about ``capacity`` bytes.
Tiers with a byte cap subclass :class:`BoundedTierContract` instead, which adds the cap tests.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

import pytest

from sgl_kvext.tiers.base import Tier
from sgl_kvext.tiers.objects import KVPage

PAGE = 40_000


def key_of(i: int, salt: str = "") -> bytes:
    return hashlib.blake2b(f"{salt}{i}".encode(), digest_size=32).digest()


def page_of(i: int, nbytes: int = PAGE, dtype: str = "bfloat16", salt: str = "") -> KVPage:
    dtype = "uint8" if nbytes % 2 else dtype     # shape x element size == bytes, always
    rng = random.Random(f"{salt}{i}")
    data = rng.randbytes(nbytes // 2) + bytes(nbytes - nbytes // 2)  # half noise, half zeros
    return KVPage(key_of(i, salt), data, dtype, (nbytes // 2,) if dtype != "uint8" else (nbytes,))


def assert_same(got: KVPage, want: KVPage) -> None:
    assert got.key == want.key
    assert bytes(got.data) == bytes(want.data)
    assert (got.dtype, got.shape) == (want.dtype, want.shape)


class TierContract:
    def make_tier(self, capacity: int) -> Tier:
        raise NotImplementedError

    @pytest.fixture
    def tier(self) -> Iterator[Tier]:
        t = self.make_tier(20 * PAGE)
        yield t
        t.close()

    def test_put_then_get_returns_the_same_page(self, tier: Tier) -> None:
        pages = [page_of(i) for i in range(3)] + [page_of(9, 3 * PAGE + 17, "float32")]
        result = tier.put(pages)
        assert set(result.stored) == {p.key for p in pages} and not result.rejected
        got = tier.get([p.key for p in pages])
        assert set(got) == {p.key for p in pages}
        for page in pages:
            assert_same(got[page.key], page)

    def test_missing_keys_are_misses(self, tier: Tier) -> None:
        tier.put([page_of(1)])
        got = tier.get([key_of(1), key_of(2), key_of(3)])
        assert list(got) == [key_of(1)]
        assert tier.exists([key_of(2), key_of(1), key_of(3)]) == [False, True, False]
        assert tier.get([]) == {} and tier.exists([]) == []

    def test_delete(self, tier: Tier) -> None:
        tier.put([page_of(1), page_of(2)])
        assert tier.delete([key_of(1), key_of(7)]) == 1
        assert tier.get([key_of(1), key_of(2)]).keys() == {key_of(2)}
        assert tier.delete([key_of(1)]) == 0

    def test_put_twice_keeps_one_copy(self, tier: Tier) -> None:
        tier.put([page_of(1)])
        used = tier.used_bytes
        result = tier.put([page_of(1)])
        assert result.stored == (key_of(1),)
        assert tier.used_bytes == used
        assert tier.delete([key_of(1)]) == 1 and tier.get([key_of(1)]) == {}

    def test_empty_and_odd_sized_pages(self, tier: Tier) -> None:
        pages = [page_of(1, 0, "uint8"), page_of(2, 1, "uint8"), page_of(3, 65_537, "uint8")]
        tier.put(pages)
        got = tier.get([p.key for p in pages])
        for page in pages:
            assert_same(got[page.key], page)

    def test_read_into_copies_held_pages_of_exactly_the_buffers_size(self, tier: Tier) -> None:
        pages = [page_of(1), page_of(2, 70_001)]
        tier.put(pages)
        out = [memoryview(bytearray(n)) for n in (PAGE, PAGE, 70_001)]
        done = tier.read_into([key_of(1), key_of(5), key_of(2)], out)
        assert done == [True, False, True]
        assert bytes(out[0]) == bytes(pages[0].data)
        assert bytes(out[2]) == bytes(pages[1].data)
        assert bytes(out[1]) == bytes(PAGE)
        # A page shorter or longer than its buffer is a miss: no stale bytes pass for KV.
        other = [memoryview(bytearray(n)) for n in (PAGE + 1, 70_000)]
        assert tier.read_into([key_of(1), key_of(2)], other) == [False, False]
        assert all(bytes(b) == bytes(len(b)) for b in other)


class BoundedTierContract(TierContract):
    """The contract plus the byte cap: held after every put, evictions carry their bytes."""

    def test_cap_is_held_and_evictions_carry_their_bytes(self) -> None:
        tier = self.make_tier(10 * PAGE)
        try:
            written = {i: page_of(i) for i in range(40)}
            evicted: dict[bytes, KVPage] = {}
            for page in written.values():
                result = tier.put([page])
                assert tier.used_bytes <= tier.capacity_bytes
                evicted.update({p.key: p for p in result.evicted})
            assert evicted, "a tier 4x over its cap must evict"
            by_key = {p.key: p for p in written.values()}
            for key, page in evicted.items():
                assert_same(page, by_key[key])
            held = tier.get(list(by_key))
            assert len(held) >= 1 and not held.keys() & evicted.keys()
            for key, page in held.items():
                assert_same(page, by_key[key])
        finally:
            tier.close()

    def test_page_larger_than_the_cap_is_rejected(self) -> None:
        tier = self.make_tier(4 * PAGE)
        try:
            result = tier.put([page_of(1, 8 * PAGE)])
            assert result.rejected == (key_of(1),) and tier.get([key_of(1)]) == {}
        finally:
            tier.close()
