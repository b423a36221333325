"""Chunk (fragment) KV in the tier chain under position-independent keys.

A fragment's KV is computed on its own, K rotated at positions ``0..n-1`` (see
``sgl_kvext.blend.compute_chunk_kv``), and
stored as one tier object shaped ``(2, layers, n, kv_heads, head_dim)`` (K then V) in the KV
dtype, under :func:`sgl_kvext.pages.keys.fragment_key` (namespace + the fragment's tokens). The same
chunk found anywhere in any prompt, by any server sharing the namespace and a disk folder or
S3 prefix, maps to the same object. An object whose dtype or shape does not fit the model and
the fragment's length is a miss (counted), never KV handed to the blend.

The scheduler thread reads fragments from the first tier (host memory) only
(``get(..., local_only=True)``): a fragment held only below is brought up by a background
thread for the next request, and one no tier holds any more is reported to ``on_gone``. An
S3 round trip per fragment on the scheduler thread (up to the S3 timeout each) is gone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from sgl_kvext.blend.prefill import ChunkKV
from sgl_kvext.pages.keys import ModelIdentity, Namespace, Tenant, fragment_key
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.objects import KVPage

logger = logging.getLogger("sgl_kvext")
#: Fragments being brought up from lower tiers at most (more are left for a later request).
MAX_PROMOTING = 256


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The geometry every stored fragment of one model has."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if min(self.layers, self.kv_heads, self.head_dim) < 1:
            raise ValueError(f"layers, kv_heads and head_dim must be >= 1, got {self}")

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def shape(self, tokens: int) -> tuple[int, ...]:
        return (2, self.layers, tokens, self.kv_heads, self.head_dim)


class FragmentStore:
    """Put and get fragment KV through a tier chain.

    Parameters
    ----------
    chain
        Tiers fastest first; puts go to the first tier and demote down, gets promote up.
    identity
        Model identity, the namespace's model part (the request's tenant is the other).
    layout
        The model's KV geometry and dtype; stored fragments must match it.
    device
        Where :meth:`get` hands fragment KV out (the model's device).
    """

    def __init__(self, chain: TierChain, identity: ModelIdentity, layout: KVLayout,
                 device: torch.device | str = "cpu") -> None:
        self.chain, self.identity, self.layout = chain, identity, layout
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self.counters = {"stored": 0, "hits": 0, "misses": 0, "bad_objects": 0,
                         "promoted": 0}
        #: Called with a fragment key no tier holds any more (found by a promotion).
        self.on_gone: Callable[[bytes], None] = lambda key: None
        self._promoting: set[bytes] = set()
        self._promoter = ThreadPoolExecutor(1, thread_name_prefix="kvext-fragment-promote")

    def key(self, tenant: Tenant, token_ids: torch.Tensor | Sequence[int] | np.ndarray) -> bytes:
        """The fragment key of ``token_ids`` [n] for ``tenant``."""
        return fragment_key(Namespace(self.identity, tenant), _ids(token_ids))

    def put(self, tenant: Tenant, kv: ChunkKV) -> bytes:
        """Store a fragment's KV (``kv.k`` / ``kv.v`` [L, n, H, D]); returns its key."""
        n = len(kv)
        expected = self.layout.shape(n)[1:]
        for name, t in (("k", kv.k), ("v", kv.v)):
            if tuple(t.shape) != expected or t.dtype != self.layout.dtype:
                raise ValueError(f"fragment {name} is {tuple(t.shape)} {t.dtype}; the model "
                                 f"needs {expected} {self.layout.dtype}")
        data = torch.stack((kv.k, kv.v)).cpu().contiguous()
        key = self.key(tenant, kv.token_ids)
        raw = data.view(torch.uint8).reshape(-1).numpy()
        self.chain.put([KVPage(key, raw.data, self.layout.dtype_name, tuple(data.shape))])
        with self._lock:
            self.counters["stored"] += 1
        return key

    def get(self, tenant: Tenant, fragments: Sequence[torch.Tensor | np.ndarray],
            local_only: bool = False) -> dict[int, ChunkKV]:
        """KV of the held fragments, by their index in ``fragments`` (each [n] token ids), on
        the store's device.

        Fragments not held, or held as an object that does not fit, are absent. With
        ``local_only`` only the first tier is read; the others are brought up in the
        background (see the module doc)."""
        found: dict[int, ChunkKV] = {}
        ids_list = [torch.from_numpy(_ids(ids).astype(np.int64)) for ids in fragments]
        keys = [self.key(tenant, ids) for ids in ids_list]
        local = self.chain.tiers[0].get(keys) if local_only else {}
        for i, (ids, key) in enumerate(zip(ids_list, keys, strict=True)):
            if local_only:
                page = local.get(key)
                if page is None:
                    self.promote(key)
            else:
                pages = self.chain.get([key]).pages
                page = pages[0] if pages else None
            kv = self._decode(page, int(ids.shape[0])) if page is not None else None
            if kv is not None:
                found[i] = ChunkKV(ids, kv[0], kv[1])
        with self._lock:
            self.counters["hits"] += len(found)
            self.counters["misses"] += len(fragments) - len(found)
        return found

    def promote(self, key: bytes) -> None:
        """Bring ``key`` up to the first tier in the background (once at a time)."""
        with self._lock:
            if key in self._promoting or len(self._promoting) >= MAX_PROMOTING:
                return
            self._promoting.add(key)
        self._promoter.submit(self._promote_now, key)

    def _promote_now(self, key: bytes) -> None:
        try:
            found = bool(self.chain.get([key]).pages)   # promotes what lower tiers hold
            with self._lock:
                self.counters["promoted"] += found
            if not found:
                self.on_gone(key)
        except Exception:     # a failed promotion is only a later miss
            logger.exception("sgl-kvext: bringing a fragment up from a lower tier failed")
        finally:
            with self._lock:
                self._promoting.discard(key)

    def wait_promotions(self, timeout_s: float) -> bool:
        """Whether no promotion is running, waiting up to ``timeout_s`` (tests, shutdown)."""
        done = threading.Event()
        self._promoter.submit(done.set)
        return done.wait(timeout_s)

    def close(self) -> None:
        self._promoter.shutdown(wait=True, cancel_futures=True)

    def _decode(self, page: KVPage, tokens: int) -> torch.Tensor | None:
        shape = self.layout.shape(tokens)
        view = memoryview(page.data).cast("B")
        nbytes = int(np.prod(shape)) * self.layout.dtype.itemsize
        if page.dtype != self.layout.dtype_name or tuple(page.shape) != shape or \
                view.nbytes != nbytes:
            with self._lock:
                self.counters["bad_objects"] += 1
            return None
        # A copy: the tier may reuse the buffer it handed out.
        raw = torch.frombuffer(bytearray(view), dtype=torch.uint8)
        return raw.view(self.layout.dtype).view(shape).to(self.device)


def _ids(token_ids: torch.Tensor | Sequence[int] | np.ndarray) -> np.ndarray:
    if isinstance(token_ids, torch.Tensor):
        return token_ids.detach().cpu().numpy()
    return np.asarray(token_ids, dtype=np.int64)
