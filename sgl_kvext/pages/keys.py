"""Page keys: chained BLAKE2b-256 hashes over token ids, seeded by a namespace.

A page key names the KV of one full page of tokens *in its context*: it hashes the page's
token ids together with the previous page's key, so equal keys mean equal prefixes. The chain
starts from a :class:`Namespace` digest that covers the model identity (config, weights,
dtype, page size, KV layout, tensor-parallel rank and size) and the request's :class:`Tenant`,
so two models or two tenants never share a key. Everything is hashed from
canonical bytes, so keys are stable across processes, machines and Python runs (no built-in
``hash()``, which PYTHONHASHSEED randomizes).

A fragment key (:func:`fragment_key`) names a chunk's KV computed on its own, independent of
where the chunk sits in a prompt: it hashes the namespace and the chunk's tokens only.
A tail key (:func:`tail_key`) names a path's last partial page: the chain so far and the
tail's exact tokens.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

KEY_BYTES = 32
_PAGE_PERSON = b"kvext-page-v1"
_NS_PERSON = b"kvext-ns-v2"    # v2: tenants length-prefixed (Tenant)
_FRAGMENT_PERSON = b"kvext-frag-v1"
_TAIL_PERSON = b"kvext-tail-v1"


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """Everything that changes the bytes of a model's KV for the same tokens.

    Parameters
    ----------
    config
        Digest (or canonical text) of the model config.
    weights
        Digest of the weights (file hashes, revision); two fine-tunes must differ here.
    dtype
        KV dtype, e.g. ``"bfloat16"``.
    page_size
        Tokens per page.
    kv_layout
        KV geometry, e.g. ``"mha:layers=30,kv_heads=3,head_dim=64"``.
    tp_rank, tp_size
        Tensor-parallel position: each rank stores its own head shard.
    pp_rank, pp_size
        Pipeline-parallel position: each stage stores its own layers.
    quantization
        SGLang's ``--quantization`` (the same checkpoint quantized computes other KV).
    object_format
        Version of the stored object format: a new format never reads old keys.
    """

    config: str
    weights: str
    dtype: str
    page_size: int
    kv_layout: str
    tp_rank: int = 0
    tp_size: int = 1
    quantization: str = ""
    pp_rank: int = 0
    pp_size: int = 1
    object_format: int = 1

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank must be in [0, tp_size), got {self.tp_rank}/{self.tp_size}")
        if not 0 <= self.pp_rank < self.pp_size:
            raise ValueError(f"pp_rank must be in [0, pp_size), got {self.pp_rank}/{self.pp_size}")

    def digest(self) -> bytes:
        return _identity_digest(self)


@dataclass(frozen=True, slots=True)
class Tenant:
    """Whose KV it is: SGLang's extra key and cache salt (both empty: the default tenant), and
    whether the requests may receive blended, approximate KV (``blend``: a namespace of its
    own, so exact requests never see it). :meth:`encode` is the one byte form keys hash:
    each part length-prefixed, so no two tenants encode alike."""

    extra_key: str = ""
    cache_salt: str = ""
    blend: bool = False

    def encode(self) -> bytes:
        parts = (self.extra_key.encode(), self.cache_salt.encode(), b"b" if self.blend else b"")
        return b"".join(len(p).to_bytes(8, "little") + p for p in parts)


#: The tenant of requests that name none and take exact KV only.
DEFAULT_TENANT = Tenant()


@dataclass(frozen=True, slots=True)
class Namespace:
    """Seed of a key chain: one model identity and one tenant."""

    model: ModelIdentity
    tenant: Tenant = DEFAULT_TENANT

    @property
    def model_digest(self) -> bytes:
        return self.model.digest()

    @property
    def digest(self) -> bytes:
        return _namespace_digest(self.model, self.tenant)


# Digests are computed once per identity / tenant (match_prefix asks on every scheduling
# pass; json + BLAKE2b of the identity took ~0.5 ms each time).
@functools.lru_cache(maxsize=256)
def _identity_digest(identity: ModelIdentity) -> bytes:
    fields = asdict(identity)
    if identity.pp_size == 1:   # no pipeline: the keys stored before pp_* existed still match
        del fields["pp_rank"], fields["pp_size"]
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(canonical, digest_size=KEY_BYTES, person=_NS_PERSON).digest()


@functools.lru_cache(maxsize=4096)
def _namespace_digest(identity: ModelIdentity, tenant: Tenant) -> bytes:
    h = hashlib.blake2b(_identity_digest(identity), digest_size=KEY_BYTES, person=_NS_PERSON)
    h.update(tenant.encode())
    return h.digest()


def _token_bytes(token_ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, bytes]:
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be one-dimensional, got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << 32):
        raise ValueError("token ids must be in [0, 2**32)")
    return ids, ids.astype("<u4").tobytes()


def fragment_key(namespace: Namespace, token_ids: Sequence[int] | np.ndarray) -> bytes:
    """Position-independent key of a fragment's KV (a chunk computed on its own).

    The same tokens under the same namespace give the same key wherever they appear in a
    prompt; a distinct BLAKE2b personalization keeps fragment keys apart from page keys.

    Parameters
    ----------
    namespace
        Model identity and tenant.
    token_ids : (n,) ints in [0, 2**32), n >= 1
    """
    ids, raw = _token_bytes(token_ids)
    if ids.size == 0:
        raise ValueError("a fragment needs at least one token")
    h = hashlib.blake2b(namespace.digest, digest_size=KEY_BYTES, person=_FRAGMENT_PERSON)
    h.update(ids.size.to_bytes(8, "little"))
    h.update(raw)
    return h.digest()


def page_keys(namespace: Namespace, token_ids: Sequence[int] | np.ndarray,
              after: bytes | None = None) -> list[bytes]:
    """Keys of the full pages of ``token_ids`` (a trailing partial page gets no key).

    Parameters
    ----------
    namespace
        Chain seed; its model identity fixes the page size.
    token_ids : (n,) ints in [0, 2**32)
    after
        Key of the page just before ``token_ids[0]`` when they continue a path (its first
        tokens hashed already); default: they start the path.

    Returns
    -------
    list of 32-byte keys, one per full page, in order.
    """
    page = namespace.model.page_size
    ids, raw = _token_bytes(token_ids)
    step = page * 4
    keys: list[bytes] = []
    prev = namespace.digest if after is None else after
    for start in range(0, (ids.size // page) * step, step):
        prev = hashlib.blake2b(prev + raw[start:start + step], digest_size=KEY_BYTES,
                               person=_PAGE_PERSON).digest()
        keys.append(prev)
    return keys


def tail_key(after: bytes, token_ids: Sequence[int] | np.ndarray) -> bytes:
    """Key of a path's last partial page: ``token_ids`` (1 to ``page_size - 1`` of them)
    continue the chain whose last full page has key ``after`` (the namespace's digest when
    the path has no full page). Its own personalization keeps it apart from page keys; the
    tokens are bound in, so a tail matches only the exact tokens it holds."""
    ids, raw = _token_bytes(token_ids)
    if ids.size == 0:
        raise ValueError("a tail needs at least one token")
    return hashlib.blake2b(after + raw, digest_size=KEY_BYTES, person=_TAIL_PERSON).digest()
