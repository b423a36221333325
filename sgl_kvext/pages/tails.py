"""Finding the partial page a spilled path ended with, whoever spilled it.

A path's last partial page is stored under :func:`~sgl_kvext.pages.keys.tail_key`, which
binds the chain key before it and its exact tokens, so its length is part of the key. A
request's prompt may continue a stored path at any page boundary; where its run of full
pages ends, the tail (if any) holds 1 to ``page_tokens - 1`` of the prompt's next tokens.
Each possible length is one key (:func:`candidates`), longest first:

- **Local tiers** (host memory, disk) are asked on the scheduler thread, one batch per tier
  (:class:`TailFinder`): a tail another instance wrote to a shared disk folder, or this
  server wrote before a restart, comes back like one it stored itself. A waiting request
  asks once per run end (the scheduler plans it on every pass); a miss is remembered until
  the request leaves, its device match shrinks (an eviction) or this process stores a tail.
- **Remote tiers** (S3): the prefetch that reads the request's full pages looks for the tail
  after the run it found (:class:`TailProbe`, hashed on the prefetcher's thread) and keeps it
  with them, when the cost model expects a page from the slowest tier to beat recomputing a
  page of tokens (one more round trip: on a GPU recomputing wins and nothing is asked).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from sgl_kvext.pages.cost_model import CostModel
from sgl_kvext.pages.keys import tail_key
from sgl_kvext.pages.read_ahead import NOTHING
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.objects import KVPage

#: Waiting requests whose last tail miss is remembered.
MAX_MISSES = 4096


class Tail(NamedTuple):
    """A stored partial page for the prompt's tokens up to ``end``; ``tier`` holds it (0 for
    a page read ahead for the request)."""

    key: bytes
    tier: int
    end: int


def candidates(after: bytes, tokens: Sequence[int], at: int, page_tokens: int,
               device_len: int = 0, align: int = 1) -> list[tuple[bytes, int]]:
    """``(key, end)`` of every tail that could follow chain key ``after`` with
    ``tokens[at:end]``, longest first: ``end`` past ``device_len`` and on an ``align``
    boundary (SGLang's page size)."""
    ends = [e for e in range(min(at + page_tokens - 1, len(tokens)), at, -1)
            if e > device_len and e % align == 0]
    if not ends:
        return []
    ids = np.asarray(tokens[at:ends[0]], dtype=np.int64)
    return [(tail_key(after, ids[:e - at]), e) for e in ends]


class TailProbe(NamedTuple):
    """What a prefetch of full pages ``keys`` (from page ``first``; ``before`` the chain key
    before them) needs to look for the tail after the run it finds. ``tokens`` is the
    request's prompt, not copied: it must not change."""

    before: bytes
    keys: Sequence[bytes]
    first: int
    tokens: Sequence[int]
    page_tokens: int
    device_len: int
    align: int

    def keys_after(self, run: int) -> list[bytes]:
        """Candidate tail keys after the first ``run`` of ``keys``, longest first."""
        after = self.keys[run - 1] if run else self.before
        return [key for key, _ in candidates(after, self.tokens, (self.first + run)
                                             * self.page_tokens, self.page_tokens,
                                             self.device_len, self.align)]


class TailFinder:
    """Finds stored tails in ``local`` tiers of ``chain`` (indices, tier 0 first), reading
    a lower one only when the cost model expects that to beat recomputing the tail."""

    def __init__(self, chain: TierChain, local: Sequence[int], cost: CostModel,
                 page_tokens: int, page_nbytes: int) -> None:
        self.chain, self.local, self.cost = chain, list(local), cost
        self.tokens, self.page_nbytes = page_tokens, page_nbytes
        #: request -> what it missed: the longest candidate's key, the shortest's end and
        #: :attr:`stored` then (a tail stored since, or a shorter device match, asks again)
        self._misses: OrderedDict[Hashable, tuple[bytes, int, int]] = OrderedDict()
        self.stored = 0

    def find(self, after: bytes, tokens: Sequence[int], at: int, device_len: int,
             align: int = 1, request_id: Hashable | None = None,
             ahead: Mapping[bytes, KVPage] = NOTHING) -> list[Tail]:
        """``[tail]`` for the longest stored tail after chain key ``after`` holding
        ``tokens[at:end]``, with ``end`` past ``device_len`` and on an ``align`` boundary;
        ``[]`` when neither ``ahead`` (pages read ahead for the request) nor a local tier
        holds one."""
        found = candidates(after, tokens, at, self.tokens, device_len, align)
        if not found:
            return []
        keys = [key for key, _ in found]
        for key, end in found:
            if key in ahead:
                return [Tail(key, 0, end)]
        missed = (keys[0], found[-1][1], self.stored)
        if request_id is not None and self._misses.get(request_id) == missed:
            return []
        for tier in self.local:
            if tier and self.cost.load_s(self.page_nbytes, tier) \
                    >= self.cost.recompute_s(found[0][1] - max(at, device_len)):
                break                    # slower tiers follow: none can beat recomputing
            held = self.chain.tiers[tier].exists(keys)
            if any(held):
                i = held.index(True)
                return [Tail(keys[i], tier, found[i][1])]
        if request_id is not None:
            self._misses[request_id] = missed
            self._misses.move_to_end(request_id)
            while len(self._misses) > MAX_MISSES:
                self._misses.popitem(last=False)
        return []

    def probe(self, before: bytes, keys: Sequence[bytes], first: int, tokens: Sequence[int],
              device_len: int, align: int) -> list[TailProbe]:
        """``[probe]`` for a prefetch of ``keys`` when a remote tier's page is expected to
        beat recomputing a page of tokens, else ``[]``."""
        slowest = len(self.chain.tiers) - 1
        if slowest in self.local or self.cost.load_s(self.page_nbytes, slowest) \
                >= self.cost.recompute_s(self.tokens - 1):
            return []
        return [TailProbe(before, keys, first, tokens, self.tokens, device_len, align)]

    def note_stored(self) -> None:
        """This process stored a tail: misses remembered before it are asked again."""
        self.stored += 1

    def forget(self, request_id: Hashable) -> None:
        """The request left."""
        self._misses.pop(request_id, None)
