"""Tier residency published as SGLang KV events (``--kv-events-config``).

SGLang's KV events say which blocks the device tree stores and removes. With the tiers on,
the tree also publishes, in the same stream and format, the pages each tier of this process
stores and removes (:meth:`TierChain.on_event <sgl_kvext.tiers.chain.TierChain.on_event>`):
``BlockStored`` / ``BlockRemoved`` with ``medium`` naming the tier (SGLang's ``StorageMedium``
values: host memory ``CPU_PINNED``, disk ``DISK``, S3 ``EXTERNAL``), ``block_size`` the tier
page's tokens and ``block_hashes`` the pages' keys as int64 (the first 8 bytes of the
32-byte page key, big-endian, signed). A tier event carries no token ids and no parent hash:
a page key already binds every token before it (``POST /kvext/lookup`` answers for a prompt).

Events arrive on tier threads; :class:`TierEventLog` buffers them (bounded in pages: the
oldest are dropped and counted when no publisher takes them) until the scheduler thread takes
them with the device tree's own.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

from sgl_kvext.sglang_plugin.surface import BlockRemoved, BlockStored
from sgl_kvext.tiers.chain import TierEvent

#: SGLang's StorageMedium value for each tier kind.
MEDIUM = {"host": "CPU_PINNED", "disk": "DISK", "s3": "EXTERNAL"}
#: Pages buffered at most between two takes.
MAX_PAGES = 1 << 16


def block_hash(key: bytes) -> int:
    """A page key as the int64 block hash the events carry."""
    return int.from_bytes(key[:8], "big", signed=True)


class TierEventLog:
    """Tier events buffered until :meth:`take` (thread-safe, bounded).

    Parameters
    ----------
    tier_names
        The chain's tiers, in order (``host``, ``disk``, ``s3``; others publish their name).
    page_tokens
        Tokens per tier page (each event's ``block_size``).
    """

    def __init__(self, tier_names: Sequence[str], page_tokens: int,
                 max_pages: int = MAX_PAGES) -> None:
        self._media = [MEDIUM.get(name, name.upper()) for name in tier_names]
        self.page_tokens, self.max_pages = page_tokens, max_pages
        self._events: deque[TierEvent] = deque()
        self._pages = 0
        self._lock = threading.Lock()
        self.dropped_pages = 0

    def add(self, event: TierEvent) -> None:
        """A :meth:`TierChain.on_event` listener."""
        with self._lock:
            self._events.append(event)
            self._pages += len(event.keys)
            while self._pages > self.max_pages and len(self._events) > 1:
                old = self._events.popleft()
                self._pages -= len(old.keys)
                self.dropped_pages += len(old.keys)

    def take(self) -> list[Any]:
        """The buffered events as SGLang ``BlockStored`` / ``BlockRemoved``, oldest first."""
        with self._lock:
            events, self._events, self._pages = list(self._events), deque(), 0
        out: list[Any] = []
        for event in events:
            hashes = [block_hash(k) for k in event.keys]
            medium = self._media[event.tier]
            if event.stored:
                out.append(BlockStored(block_hashes=hashes, parent_block_hash=None,
                                       token_ids=[], block_size=self.page_tokens, lora_id=None,
                                       medium=medium))
            else:
                out.append(BlockRemoved(block_hashes=hashes, medium=medium))
        return out
