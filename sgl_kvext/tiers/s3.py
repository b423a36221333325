"""S3 tier: self-describing objects in a bucket, shared by every instance with the namespace.

boto3 with a bounded connection pool, connect / read timeouts and standard retries; batch
calls run in parallel and return within ``op_timeout_s`` (late answers become misses); large
objects go up in multipart. A :class:`CircuitBreaker` turns an unreachable or stalled
endpoint into immediate misses until a probe succeeds. Keys:
``PREFIX/objects/<namespace>/<k0k1>/<key>.kvx``; corrupt objects move to
``PREFIX/quarantine/``.
"""

from __future__ import annotations

import io
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from sgl_kvext.scheduler_turn import on_behalf, pause
from sgl_kvext.tiers.base import PutResult, Tier, TierCapabilities
from sgl_kvext.tiers.breaker import CircuitBreaker
from sgl_kvext.tiers.objects import (
    PLAIN,
    CorruptObject,
    KVPage,
    Protection,
    decode_object,
    encode_object,
)

logger = logging.getLogger("sgl_kvext")
T = TypeVar("T")
UNBOUNDED = (1 << 63) - 1
_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
#: boto3 events between the phases of one request (parameters, signing, sending, parsing
#: the answer) where a background request yields the scheduler its turn (scheduler_turn).
TURN_EVENTS = ("before-parameter-build.s3", "before-sign.s3", "before-send.s3",
               "needs-retry.s3")


#: Bad objects one process copies to ``quarantine/`` (the rest are only deleted).
QUARANTINE_KEEP = 64


class S3Tier(Tier):
    """S3-compatible object-store tier.

    Parameters
    ----------
    url
        ``s3://bucket[/prefix]``.
    namespace
        Model-identity digest; objects of other namespaces are never read.
    endpoint, region, credentials
        ``endpoint_url``, region and optional explicit keys (``aws_access_key_id`` /
        ``aws_secret_access_key``); otherwise boto3's credential chain.
    connections
        Connection-pool size and read parallelism.
    write_calls
        Pages one ``put`` uploads at once. Every S3 call is Python work (signing, parsing)
        under the GIL the serving scheduler's thread shares; writes run in the background,
        so few run at once (measured, docs/reliability.md: 16 at once blocked the scheduler
        thread for 80-180 ms between two forwards on a 2-core machine, 2 at once 44-86 ms).
    op_timeout_s
        Upper bound on one batch call; answers arriving later are misses.
    """

    name = "s3"

    def __init__(self, url: str, namespace: bytes, *, endpoint: str | None = None,
                 region: str = "us-east-1", credentials: dict[str, str] | None = None,
                 codec: str = "zstd", level: int = 1, connections: int = 16,
                 write_calls: int = 2,
                 connect_timeout_s: float = 1.0, read_timeout_s: float = 3.0,
                 retries: int = 1, op_timeout_s: float = 5.0,
                 multipart_threshold: int = 64 << 20,
                 breaker: CircuitBreaker | None = None, protection: Protection = PLAIN) -> None:
        self.protection = protection
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"S3 url must look like s3://bucket[/prefix], got {url!r}")
        self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
        self.namespace, self.codec, self.level = namespace, codec, level
        self.op_timeout_s = op_timeout_s
        if write_calls < 1:
            raise ValueError(f"write_calls must be >= 1, got {write_calls}")
        self.write_calls = write_calls
        self._client = _client(endpoint, region, credentials, connect_timeout_s,
                               read_timeout_s, retries, connections)
        for event in TURN_EVENTS:
            self._client.meta.events.register(event, _yield_turn)
        self._transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                        multipart_chunksize=max(multipart_threshold // 4, 5 << 20),
                                        max_concurrency=4)
        self.breaker = breaker or CircuitBreaker()
        self._pool = ThreadPoolExecutor(connections, thread_name_prefix="kvext-s3")
        self._lock = threading.Lock()
        self._used = 0
        self._counters = {"quarantined": 0, "errors": 0, "timeouts": 0, "shed": 0}
        self._inflight = 0
        self.max_inflight = 4 * connections
        self._kept = 0        # objects copied to quarantine/ (QUARANTINE_KEEP at most)
        self._ensure_bucket()

    # ------------------------------------------------------------- interface
    @property
    def capabilities(self) -> TierCapabilities:
        return TierCapabilities(persistent=True, shared=True)

    @property
    def capacity_bytes(self) -> int:
        return UNBOUNDED

    @property
    def used_bytes(self) -> int:
        """Bytes this instance uploaded (the bucket is never listed)."""
        return self._used

    def get(self, keys: Sequence[bytes]) -> dict[bytes, KVPage]:
        pause()       # a background caller yields the scheduler its turn (scheduler_turn)
        pages = self._parallel(self._get_one, keys, None)
        return {k: p for k, p in zip(keys, pages, strict=True) if p is not None}

    def put(self, pages: Sequence[KVPage]) -> PutResult:
        """``write_calls`` pages at a time, each group within the operation timeout (a
        background caller yields the scheduler its turn before each, scheduler_turn)."""
        ok = [done for lo in range(0, len(pages), self.write_calls)
              for done in self._group(self._put_one, pages[lo:lo + self.write_calls], False)]
        return PutResult(tuple(p.key for p, s in zip(pages, ok, strict=True) if s),
                         tuple(p.key for p, s in zip(pages, ok, strict=True) if not s))

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        return self._parallel(self._exists_one, keys, False)

    def delete(self, keys: Sequence[bytes]) -> int:
        held = [k for k, e in zip(keys, self.exists(keys), strict=True) if e]
        for start in range(0, len(held), 1000):
            batch = {"Objects": [{"Key": self._object_key(k)} for k in held[start:start + 1000]],
                     "Quiet": True}
            self._call(partial(self._client.delete_objects, Bucket=self.bucket, Delete=batch))
        return len(held)

    def stats(self) -> dict[str, int]:
        return {**self._counters, "breaker_opened": self.breaker.opened}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------- internals
    def _object_key(self, key: bytes, area: str = "objects") -> str:
        name = key.hex()
        parts = [self.prefix] if self.prefix else []
        return "/".join([*parts, area, self.namespace.hex()[:32], name[:2], name + ".kvx"])

    def _group(self, fn: Callable[[Any], T], items: Sequence[Any], late: T) -> list[T]:
        pause()
        return self._parallel(fn, items, late)

    def _parallel(self, fn: Callable[[Any], T], items: Sequence[Any], late: T) -> list[T]:
        """``fn`` over ``items`` on the pool, ``late`` for what misses the operation timeout.
        Calls still running past it are bounded (``max_inflight``): a batch that would pass
        the bound is answered ``late`` at once (``shed``), so a slow S3 cannot pile up work
        and memory; a batch that timed out counts as a breaker failure even if its calls
        succeed later (a slow-but-answering S3 trips the breaker too)."""
        with self._lock:
            if self._inflight + len(items) > self.max_inflight:
                self._counters["shed"] += len(items)
                return [late] * len(items)
            self._inflight += len(items)
        counted = on_behalf(self._counted)       # pool threads pause as this caller would
        futures = [self._pool.submit(counted, fn, item) for item in items]
        done, pending = wait(futures, timeout=self.op_timeout_s)
        if pending:
            with self._lock:
                self._counters["timeouts"] += len(pending)
            self.breaker.failure()
        return [f.result() if f in done else late for f in futures]

    def _counted(self, fn: Callable[[Any], T], item: Any) -> T:
        try:
            return fn(item)
        finally:          # before the result is set: a caller that saw it done sees this
            with self._lock:
                self._inflight -= 1

    def _call(self, fn: Callable[[], T]) -> tuple[bool, T | None]:
        """Run one S3 request through the breaker: (answered, result); a 404 is answered."""
        if not self.breaker.allow():
            return False, None
        try:
            result = fn()
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                self.breaker.success()
                return True, None
            self._failed(exc)
            return False, None
        except Exception as exc:     # anything else too: a probe must never leave it half-open
            self._failed(exc)
            return False, None
        self.breaker.success()
        return True, result

    def _failed(self, exc: BaseException) -> None:
        self.breaker.failure()
        with self._lock:
            self._counters["errors"] += 1
        logger.debug("sgl-kvext s3 tier: %s: %s", type(exc).__name__, exc)

    def _get_one(self, key: bytes) -> KVPage | None:
        name = self._object_key(key)
        answered, resp = self._call(lambda: self._client.get_object(Bucket=self.bucket,
                                                                     Key=name))
        if not answered or resp is None:
            return None
        try:
            blob = resp["Body"].read()
        except (BotoCoreError, OSError) as exc:
            self._failed(exc)
            return None
        try:
            return decode_object(blob, self.namespace, key, self.protection)
        except CorruptObject:
            self._quarantine(key)
            return None

    def _put_one(self, page: KVPage) -> bool:
        if self._exists_one(page.key):   # keys name contents: an existing object is this page
            return True
        blob = encode_object(page, self.namespace, self.codec, self.level,
                             self.protection).join()
        name = self._object_key(page.key)
        if len(blob) >= self._transfer.multipart_threshold:
            answered, _ = self._call(lambda: self._client.upload_fileobj(
                io.BytesIO(blob), self.bucket, name, Config=self._transfer))
        else:
            answered, _ = self._call(lambda: self._client.put_object(Bucket=self.bucket,
                                                                     Key=name, Body=blob))
        if answered:
            with self._lock:
                self._used += len(blob)
        return answered

    def _exists_one(self, key: bytes) -> bool:
        answered, resp = self._call(lambda: self._client.head_object(
            Bucket=self.bucket, Key=self._object_key(key)))
        return answered and resp is not None

    def _quarantine(self, key: bytes) -> None:
        """Move a bad object out of the way: the first QUARANTINE_KEEP of this process are
        copied to ``quarantine/`` for inspection, later ones only deleted (bounded)."""
        src = self._object_key(key)
        with self._lock:
            keep = self._kept < QUARANTINE_KEEP
            self._kept += keep
        if keep:
            dst = self._object_key(key, "quarantine") + "." + uuid.uuid4().hex[:8]
            self._call(lambda: self._client.copy_object(
                Bucket=self.bucket, Key=dst, CopySource={"Bucket": self.bucket, "Key": src}))
        removed, _ = self._call(lambda: self._client.delete_object(Bucket=self.bucket,
                                                                   Key=src))
        if removed:
            with self._lock:
                self._counters["quarantined"] += 1

    def _ensure_bucket(self) -> None:
        answered, found = self._call(lambda: self._client.head_bucket(Bucket=self.bucket))
        if answered and found is None:
            self._call(lambda: self._client.create_bucket(Bucket=self.bucket))
        elif not answered:
            logger.warning("sgl-kvext s3 tier: bucket %s unreachable; reads miss until it "
                           "answers", self.bucket)


def _yield_turn(**_: Any) -> None:
    """A boto3 event handler: a background request waits while the scheduler works between
    forwards (never one the scheduler waits for); None lets the request go on."""
    pause()


def _client(endpoint: str | None, region: str, credentials: dict[str, str] | None,
            connect_timeout_s: float, read_timeout_s: float, retries: int,
            connections: int = 10) -> Any:
    """A boto3 S3 client with path-style addressing, bounded timeouts and retries."""
    config = Config(max_pool_connections=connections, connect_timeout=connect_timeout_s,
                    read_timeout=read_timeout_s, s3={"addressing_style": "path"},
                    retries={"total_max_attempts": retries + 1, "mode": "standard"})
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region,
                                          config=config, **(credentials or {}))


_REFUSED = {"403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
            "InvalidToken", "ExpiredToken"}


def refused_access(url: str, *, endpoint: str | None = None, region: str = "us-east-1",
                   credentials: dict[str, str] | None = None,
                   timeout_s: float = 5.0) -> str | None:
    """Why the S3 server at ``endpoint`` refuses this process's credentials for ``url``'s
    bucket (one line), or None. One ``HEAD`` of the bucket, made at server start-up; an
    endpoint that does not answer is not a refusal (the tier misses until it answers)."""
    bucket = urlsplit(url).netloc
    try:
        _client(endpoint, region, credentials, min(1.0, timeout_s), timeout_s,
                retries=0).head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _REFUSED:
            return (f"the S3 server refused this process's credentials for bucket {bucket!r} "
                    f"({code}); set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or another "
                    "boto3 credential source")
    except (BotoCoreError, OSError):
        pass
    return None
