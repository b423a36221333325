"""Moves KV between the device KV pool and the tier chain, page by page.

The tree calls this module and knows nothing of tiers; the tiers know nothing of the tree.

- :meth:`KVTiering.spill` stores the full tier pages of a token path (e.g. an evicted node and
  the partial page it shares with its parent) under their chained page keys.
- :meth:`KVTiering.plan` finds, after the device-resident prefix, the run of pages the fastest
  tier holds now, and asks the :class:`Prefetcher` to bring the rest up from slower tiers
  in the background.
- :meth:`KVTiering.load` copies a planned run into freshly allocated pool slots; any page
  that has gone missing makes the whole load fail (the caller recomputes).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sgl_kvext.pages.cost_model import CostModel
from sgl_kvext.pages.keys import ModelIdentity, Namespace, page_keys
from sgl_kvext.pages.kv_pages import PagedKV
from sgl_kvext.pages.prefetch import Prefetcher
from sgl_kvext.pages.recent_keys import RecentKeys
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.objects import KVPage

logger = logging.getLogger("sgl_kvext")
_KNOWN_KEYS = 1 << 16
# Loads go through one reused staging buffer of at most this size, in batches of pages: a
# buffer sized to the largest load would keep up to the whole pool's bytes resident.
_STAGING_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """Pages ``keys`` hold tokens ``[first_page * T, ...)``; tokens ``[start, end)`` are new."""

    keys: tuple[bytes, ...]
    first_page: int
    start: int
    end: int

    @property
    def tokens(self) -> int:
        return self.end - self.start


class KVTiering:
    """Page KV between one model's device pool and a tier chain.

    Parameters
    ----------
    pool
        The device pool's per-layer K / V tensors, with the tier page size.
    chain
        Tiers fastest first; tier 0 is the one loads are served from.
    identity
        Model identity: seeds every key chain (with the request's salt).
    prefetch_threads
        Background workers bringing pages up from slower tiers.
    """

    def __init__(self, pool: PagedKV, chain: TierChain, identity: ModelIdentity,
                 prefetch_threads: int = 2) -> None:
        if identity.page_size != pool.tokens:
            raise ValueError("identity.page_size must equal the pool's tokens_per_page")
        self.pool, self.chain, self.identity = pool, chain, identity
        self.tokens = pool.tokens
        self.cost = CostModel([t.name for t in chain.tiers], pool.device.type)
        self.prefetcher = Prefetcher(chain, prefetch_threads, cost=self.cost)
        # Keys stored and not seen lost since: spilling them again is skipped.
        self._known = RecentKeys(_KNOWN_KEYS)
        chain.on_loss(self._known.discard)
        self._staging: torch.Tensor | None = None   # used by load() on the scheduler thread
        self._lock = threading.Lock()
        self.counters = {"spilled_pages": 0, "loaded_pages": 0, "failed_loads": 0}

    def keys_for(self, salt: str, tokens: Sequence[int]) -> list[bytes]:
        return page_keys(Namespace(self.identity, salt), np.asarray(tokens, dtype=np.int64))

    # ------------------------------------------------------------------ spill
    def spill(self, salt: str, tokens: Sequence[int], slots: torch.Tensor, from_token: int) -> int:
        """Store the full pages of ``tokens`` that end after ``from_token``.

        Parameters
        ----------
        salt
            Tenant namespace (cache salt / extra key).
        tokens : (n,) ints
            The whole path from the root.
        slots : (n,) int64
            Pool slots holding the path's KV (still intact).
        from_token
            Tokens before this are stored already (or belong to another node).

        Returns
        -------
        Pages handed to the chain.
        """
        keys = self.keys_for(salt, tokens)
        first = from_token // self.tokens
        todo = [p for p in range(first, len(keys)) if not self._known.seen(keys[p])]
        if not todo:
            return 0
        index = torch.tensor(todo, dtype=torch.int64)
        page_slots = slots[: len(keys) * self.tokens].view(len(keys), self.tokens)[index]
        data = self.pool.gather_pages(page_slots)
        raw = data.view(torch.uint8).reshape(len(todo), -1).numpy()
        pages = [KVPage(keys[p], raw[i].data, _dtype_name(data), self.pool.page_shape)
                 for i, p in enumerate(todo)]
        self._known.add(keys[p] for p in todo)   # before put: a loss during it is heard after
        self.chain.put(pages)
        with self._lock:
            self.counters["spilled_pages"] += len(pages)
        return len(pages)

    # ------------------------------------------------------------------- load
    def plan(self, salt: str, tokens: Sequence[int], device_len: int,
             prefetch_id: object | None = None) -> LoadPlan | None:
        """The loadable run after ``device_len`` tokens, from tier 0 only (no waiting).

        Pages missing from tier 0 are prefetched under ``prefetch_id`` (when given), so a
        later call finds them. Returns None when no new token is loadable now.
        """
        keys = self.keys_for(salt, tokens)
        first = device_len // self.tokens
        rest = keys[first:]
        if not rest:
            return None
        held = self.chain.tiers[0].exists(rest)
        run = next((i for i, h in enumerate(held) if not h), len(rest))
        if run < len(rest) and len(self.chain.tiers) == 1:
            self._known.discard(rest[run:run + 1])   # in no tier: spill it again next time
        if run < len(rest) and prefetch_id is not None and len(self.chain.tiers) > 1:
            self.prefetcher.request(prefetch_id, rest[run:])
        end = (first + run) * self.tokens
        if end <= device_len:
            return None
        return LoadPlan(tuple(rest[:run]), first, device_len, end)

    def load(self, plan: LoadPlan, slots: torch.Tensor) -> bool:
        """Copy the planned tokens into ``slots`` (``plan.tokens`` of them); False on a miss.

        Pages are read and scattered in batches that fit the staging buffer; after a miss the
        slots may hold part of the KV and must be freed by the caller, never used.
        """
        if slots.numel() != plan.tokens:
            raise ValueError(f"{slots.numel()} slots for {plan.tokens} tokens")
        staging = self._staging_buffer()
        base = plan.first_page * self.tokens   # token index of the first page's first token
        for lo_page in range(0, len(plan.keys), staging.shape[0]):
            keys = list(plan.keys[lo_page:lo_page + staging.shape[0]])
            views = [staging[i].numpy().data for i in range(len(keys))]
            read = self.chain.tiers[0].read_into(keys, views)
            if not all(read):
                self._known.discard(k for k, ok in zip(keys, read, strict=True) if not ok)
                with self._lock:
                    self.counters["failed_loads"] += 1
                return False
            first_token = base + lo_page * self.tokens
            lo = max(plan.start, first_token)
            hi = min(plan.end, first_token + len(keys) * self.tokens)
            pages = staging[:len(keys)].view(self.pool.dtype).view(len(keys),
                                                                   *self.pool.page_shape)
            self.pool.scatter_tokens(slots[lo - plan.start:hi - plan.start], pages,
                                     skip=lo - first_token)
            if self.pool.device.type == "cuda":   # the copy out of pinned staging is async:
                torch.cuda.current_stream(self.pool.device).synchronize()   # finish it first
        with self._lock:
            self.counters["loaded_pages"] += len(plan.keys)
        return True

    def _staging_buffer(self) -> torch.Tensor:
        """The reused (pages, page_nbytes) load buffer: fresh memory costs page faults per load.

        Allocated once at its full size, so the resident set does not step up with the
        largest load seen so far.
        """
        if self._staging is None:
            pages = max(1, _STAGING_BYTES // self.pool.page_nbytes)
            self._staging = torch.empty((pages, self.pool.page_nbytes), dtype=torch.uint8,
                                        pin_memory=self.pool.device.type == "cuda")
        return self._staging

    @property
    def bytes_per_token(self) -> float:
        return self.pool.page_nbytes / self.tokens

    def close(self) -> None:
        self.prefetcher.close()
        self.chain.close()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")

