"""Build the tier chain a :class:`TierConfig` describes: host, then disk, then S3.

A tier is left out when its setting disables it (``host_size`` 0, no ``disk_dir``, no
``s3_url``). Host memory holds raw bytes; disk and S3 use the configured codec. Every tier is
wrapped in :class:`MeteredTier` so the chain reports per-tier metrics.
"""

from __future__ import annotations

from sgl_kvext.config.settings import TierConfig
from sgl_kvext.tiers.base import Tier
from sgl_kvext.tiers.chain import TierChain
from sgl_kvext.tiers.disk import DiskTier
from sgl_kvext.tiers.host import HostTier
from sgl_kvext.tiers.metrics import MeteredTier
from sgl_kvext.tiers.objects import PLAIN, Protection
from sgl_kvext.tiers.s3 import S3Tier


def build_tiers(config: TierConfig, namespace: bytes,
                s3_credentials: dict[str, str] | None = None,
                page_bytes: int | None = None) -> list[MeteredTier]:
    """The configured tiers, fastest first (may be empty).

    ``page_bytes`` (the size of one tier page) makes each host block hold exactly one page,
    so a page is one contiguous copy in and out.
    """
    tiers: list[Tier] = []
    protection = PLAIN
    if config.object_key_file is not None:
        protection = Protection.tagged(config.object_key_file.read_bytes().strip())
    if config.encryption_key_file is not None:
        protection = Protection.encrypted(config.encryption_key_file.read_bytes().strip())
    if config.host_size > 0:
        tiers.append(HostTier(config.host_size, config.eviction_policy,
                              **({"block_bytes": page_bytes} if page_bytes else {})))
    if config.disk_dir is not None and config.disk_size > 0:
        tiers.append(DiskTier(config.disk_dir, config.disk_size, namespace, codec=config.codec,
                              protection=protection))
    if config.s3_url is not None:
        tiers.append(S3Tier(config.s3_url, namespace, endpoint=config.s3_endpoint,
                            region=config.s3_region, credentials=s3_credentials,
                            codec=config.codec, op_timeout_s=config.s3_timeout_s,
                            connect_timeout_s=min(1.0, config.s3_timeout_s),
                            read_timeout_s=min(3.0, config.s3_timeout_s),
                            protection=protection))
    return [MeteredTier(t) for t in tiers]


def build_chain(config: TierConfig, namespace: bytes,
                s3_credentials: dict[str, str] | None = None,
                page_bytes: int | None = None) -> TierChain:
    """A :class:`TierChain` over :func:`build_tiers`; ValueError when every tier is off."""
    tiers = build_tiers(config, namespace, s3_credentials, page_bytes)
    if not tiers:
        raise ValueError("every tier is disabled: set --kvext-host-size above 0, "
                         "--kvext-disk-dir or --kvext-s3-url")
    return TierChain(tiers, write_policy=config.write_policy)
