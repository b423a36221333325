"""Whose KV a request's tokens are, read off SGLang's keys: one parse, one encoder.

SGLang keeps tenants apart in its radix tree by the request's extra key and cache salt.
Requests that may receive blended (approximate) KV get :data:`BLEND_MARK` appended to their
extra key when they are created, so SGLang's tree keeps them apart from exact requests too;
:func:`tenant_of` turns the pair back into a :class:`~sgl_kvext.pages.keys.Tenant` (the mark
becomes ``blend=True``), which every page and fragment key hashes unambiguously.
"""

from __future__ import annotations

from typing import Any

from sgl_kvext.pages.keys import Tenant

#: Appended to the extra key of requests that may receive blended KV.
BLEND_MARK = "\x00kvext-blend"


def with_blend_mark(extra_key: str | None) -> str:
    """The extra key of a request that may receive blended KV."""
    return (extra_key or "") + BLEND_MARK


def tenant(extra_key: str | None, cache_salt: str | None) -> Tenant:
    """The tenant of SGLang's ``extra_key`` / ``cache_salt`` pair (the blend mark parsed)."""
    extra = extra_key or ""
    blend = extra.endswith(BLEND_MARK)
    return Tenant(extra[:-len(BLEND_MARK)] if blend else extra, cache_salt or "", blend)


def tenant_of(key: Any) -> Tenant:
    """The tenant of a ``RadixKey``."""
    return tenant(key.extra_key, key.cache_salt)
