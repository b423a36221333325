"""Page keys of token paths, hashed as little as possible.

A page's key chains every earlier page's (:func:`~sgl_kvext.pages.keys.page_keys`), so a
path's keys cost one pass over its tokens. Two memories keep that pass short:

- **Anchors**: the key of a tree node's last full page, under the node's id (ids are never
  reused and a node's path never changes). A path continuing a remembered node hashes only
  its own tokens: a chat's turn hashes the turn, not its history.
- **Request keys**: a waiting request is matched on every scheduling pass and its prompt
  does not change; its keys are remembered under its id together with the tokens they were
  hashed from (ids are the client's to choose: another prompt under the same id must not
  reuse them). Bounded in requests and in remembered tokens.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from typing import NamedTuple

import numpy as np

from sgl_kvext.pages.keys import ModelIdentity, Namespace, Tenant, page_keys

#: Requests whose page keys are remembered between scheduling passes, and the most prompt
#: tokens remembered with them (4 bytes each).
MAX_REQUESTS = 4096
MAX_REQUEST_TOKENS = 1 << 23
#: Prefixes (tree nodes) whose chain key is remembered.
MAX_ANCHORS = 1 << 16


class KeyChain(NamedTuple):
    """Page keys of a path from page ``first`` on; ``before`` is the chain key preceding
    them (the last earlier page's, or the namespace digest at page 0)."""

    first: int
    before: bytes
    keys: list[bytes]

    def since(self, page: int) -> KeyChain:
        """The keys from ``page`` (>= ``first``) on."""
        if page == self.first:
            return self
        skip = page - self.first
        return KeyChain(page, self.keys[skip - 1], self.keys[skip:])


class _RequestKeys(NamedTuple):
    tenant: Tenant
    tokens: np.ndarray          # int32: what the keys were hashed from
    chain: KeyChain


class _Anchor(NamedTuple):
    """The key of a prefix's last full page (page ``pages - 1``)."""

    tenant: Tenant
    pages: int
    key: bytes


class PathKeys:
    """Page keys of paths for one model identity and page size (one thread: the
    scheduler's)."""

    def __init__(self, identity: ModelIdentity, page_tokens: int) -> None:
        self.identity, self.tokens = identity, page_tokens
        self._requests: OrderedDict[Hashable, _RequestKeys] = OrderedDict()
        self._request_tokens = 0
        self._anchors: OrderedDict[Hashable, _Anchor] = OrderedDict()

    def all(self, tenant: Tenant, tokens: Sequence[int]) -> list[bytes]:
        """Page keys of ``tokens`` (a path from the root) for ``tenant``."""
        return page_keys(Namespace(self.identity, tenant), np.asarray(tokens, dtype=np.int64))

    def from_page(self, tenant: Tenant, tokens: Sequence[int], first: int,
                  prefix: Iterable[tuple[Hashable, int]]) -> KeyChain:
        """Keys of the full pages of ``tokens`` from page ``first`` on.

        ``prefix`` names paths ``tokens`` continues, deepest first: ``(id, length)`` of tree
        nodes whose path is ``tokens[:length]``, the first one at least ``first`` pages long.
        Only the tokens after the deepest remembered anchor are hashed; the deepest node
        becomes an anchor."""
        namespace = Namespace(self.identity, tenant)
        start, before = 0, namespace.digest        # pages known, the chain key after them
        deepest: tuple[Hashable, int] | None = None
        for node_id, length in prefix:
            pages = length // self.tokens
            if deepest is None:
                deepest = (node_id, pages)
            if pages == 0:
                break
            anchor = self._anchors.get(node_id)
            if (anchor is not None and anchor.tenant == tenant and anchor.pages == pages
                    and pages <= first):
                self._anchors.move_to_end(node_id)
                start, before = pages, anchor.key
                break
        keys = page_keys(namespace, np.asarray(tokens[start * self.tokens:], dtype=np.int64),
                         after=before)
        if deepest is not None and start < deepest[1] <= start + len(keys):
            self._anchors[deepest[0]] = _Anchor(tenant, deepest[1], keys[deepest[1] - start - 1])
            self._anchors.move_to_end(deepest[0])
            while len(self._anchors) > MAX_ANCHORS:
                self._anchors.popitem(last=False)
        return KeyChain(start, before, keys).since(first)

    def for_request(self, tenant: Tenant, tokens: Sequence[int], first: int,
                    request_id: Hashable | None, prefix: Iterable[tuple[Hashable, int]]
                    ) -> KeyChain:
        """:meth:`from_page`, remembered under ``request_id`` when given."""
        if request_id is None:
            return self.from_page(tenant, tokens, first, prefix)
        ids = _int64(tokens)
        cached = self._requests.get(request_id)
        if (cached is not None and cached.tenant == tenant and cached.chain.first <= first
                and np.array_equal(cached.tokens, ids)):
            self._requests.move_to_end(request_id)
            return cached.chain.since(first)
        chain = self.from_page(tenant, tokens, first, prefix)
        self.forget(request_id)
        self._requests[request_id] = _RequestKeys(tenant, ids.astype(np.int32), chain)
        self._request_tokens += ids.size
        while self._requests and (len(self._requests) > MAX_REQUESTS
                                  or self._request_tokens > MAX_REQUEST_TOKENS):
            self._request_tokens -= self._requests.popitem(last=False)[1].tokens.size
        return chain

    def forget(self, request_id: Hashable) -> None:
        """The request left: drop its remembered keys."""
        cached = self._requests.pop(request_id, None)
        if cached is not None:
            self._request_tokens -= cached.tokens.size


def _int64(tokens: Sequence[int]) -> np.ndarray:
    """``tokens`` as int64 without a copy when SGLang hands an ``array('q')``."""
    if isinstance(tokens, array) and tokens.itemsize == 8:
        return np.frombuffer(tokens, dtype=np.int64)
    return np.asarray(tokens, dtype=np.int64)
