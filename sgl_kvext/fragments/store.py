"""Chunk (fragment) KV in the tier chain under position-independent keys.

A fragment's KV is computed on its own at positions ``0..n-1`` (see ``sgl_kvext.blend``) and
stored as one tier object shaped ``(2, layers, n, kv_heads, head_dim)`` (K then V) in the KV
dtype, under :func:`sgl_kvext.pages.keys.fragment_key` (namespace + the fragment's tokens). The same
chunk found anywhere in any prompt, by any server sharing the namespace and a disk folder or
S3 prefix, maps to the same object. An object whose dtype or shape does not fit the model and
the fragment's length is a miss (counted), never KV handed to the blend.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sgl_kvext.blend.prefill import ChunkKV
from sgl_kvext.pages.keys import ModelIdentity, Namespace, Tenant, fragment_key
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.objects import KVPage


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
    """

    def __init__(self, chain: TierChain, identity: ModelIdentity, layout: KVLayout) -> None:
        self.chain, self.identity, self.layout = chain, identity, layout
        self._lock = threading.Lock()
        self.counters = {"stored": 0, "hits": 0, "misses": 0, "bad_objects": 0}

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

    def exists(self, tenant: Tenant, fragments: Sequence[torch.Tensor | np.ndarray]) -> list[bool]:
        """Whether each fragment ([n] token ids) is held by some tier (a hint)."""
        keys = [self.key(tenant, ids) for ids in fragments]
        return [self.chain.lookup([k]).run == 1 for k in keys]

    def get(self, tenant: Tenant, fragments: Sequence[torch.Tensor]) -> dict[int, ChunkKV]:
        """KV of the held fragments, by their index in ``fragments`` (each [n] token ids).

        Fragments not held, or held as an object that does not fit, are absent."""
        found: dict[int, ChunkKV] = {}
        for i, ids in enumerate(fragments):
            ids = torch.as_tensor(_ids(ids), dtype=torch.int64)
            pages = self.chain.get([self.key(tenant, ids)]).pages
            kv = self._decode(pages[0], int(ids.shape[0])) if pages else None
            if kv is not None:
                found[i] = ChunkKV(ids, kv[0], kv[1])
        with self._lock:
            self.counters["hits"] += len(found)
            self.counters["misses"] += len(fragments) - len(found)
        return found

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
        return raw.view(self.layout.dtype).view(shape)


def _ids(token_ids: torch.Tensor | Sequence[int] | np.ndarray) -> np.ndarray:
    if isinstance(token_ids, torch.Tensor):
        return token_ids.detach().cpu().numpy()
    return np.asarray(token_ids, dtype=np.int64)
