"""Tier benchmark: each tier against its raw limit, on the same bytes, in one run.

- host: ``HostTier`` put / get vs a single-thread ``memcpy`` (numpy copy) of the same bytes;
- disk: ``DiskTier`` (codec ``none``) write / cold read vs raw ``pwrite + fsync`` /
  ``preadv`` of files of the same sizes (page cache dropped with ``posix_fadvise`` before
  every cold read); ``disk_keyed`` the same with a deployment key (keyed BLAKE2b tags),
  ``disk_encrypted`` with an encryption key (AES-256-GCM);
- s3: ``S3Tier`` (codec ``none``) put / get vs raw boto3 ``put_object`` / ``get_object`` of
  the same bytes at the same parallelism, against the same SeaweedFS on loopback;
- codec: zstd level 1 with byte shuffle on real SmolLM2 bf16 KV (ratio, MB/s);
- pool: spill and load of a ~4k-token path between a KV pool and the host tier, straight
  into / out of its blocks and through the staging buffer, against one copy of the same
  bytes (:mod:`sgl_kvext_bench.pool_copy`).

Each figure is the median of ``repeats`` runs, tier and limit alternating.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from sgl_kvext.tiers.disk import DiskTier
from sgl_kvext.tiers.host import HostTier
from sgl_kvext.tiers.objects import PLAIN, KVPage, Protection
from sgl_kvext.tiers.s3 import S3Tier

TARGET = 0.8
S3_CONNECTIONS = 16


def _pages(n: int, size: int, seed: int) -> list[KVPage]:
    rng = np.random.default_rng(seed)
    return [KVPage(rng.bytes(32), rng.integers(0, 255, size, dtype=np.uint8).tobytes(),
                   "uint8", (size,)) for _ in range(n)]


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _median_rate(nbytes: int, fn: Callable[[], Any], repeats: int,
                 setup: Callable[[], Any] | None = None) -> float:
    """Median rate of ``fn`` over ``repeats`` runs; ``setup`` runs untimed before each."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return _gbps(nbytes, statistics.median(times))


def _result(put: float, get: float, limit_put: float, limit_get: float) -> dict[str, Any]:
    return {"put_gbps": put, "get_gbps": get, "limit_put_gbps": limit_put,
            "limit_get_gbps": limit_get, "put_ratio": put / limit_put,
            "get_ratio": get / limit_get,
            "meets_target": put / limit_put >= TARGET and get / limit_get >= TARGET}


def bench_host(pages: list[KVPage], repeats: int) -> dict[str, Any]:
    total = sum(p.nbytes for p in pages)
    keys = [p.key for p in pages]
    tier = HostTier(total + len(pages) * (64 << 10))
    srcs = [np.frombuffer(p.data, dtype=np.uint8) for p in pages]
    dsts = [np.empty_like(s) for s in srcs]

    def memcpy() -> None:
        for s, d in zip(srcs, dsts, strict=True):
            np.copyto(d, s)

    views = [d.data for d in dsts]
    limit = _median_rate(total, memcpy, repeats)
    put = _median_rate(total, lambda: tier.put(pages), repeats, lambda: tier.delete(keys))
    get = _median_rate(total, lambda: tier.read_into(keys, views), repeats)
    fresh = _median_rate(total, lambda: tier.get(keys), repeats)
    # get: read_into the caller's buffers (how KV returns to a pool); get_fresh: get(), which
    # returns newly allocated memory and so pays its page faults.
    return {**_result(put, get, limit, limit), "get_fresh_gbps": fresh}


def _drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_disk(pages: list[KVPage], repeats: int, root: Path,
               protection: Protection = PLAIN) -> dict[str, Any]:
    total = sum(p.nbytes for p in pages)
    raw_dir = root / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    raw_paths = [raw_dir / f"{i}.bin" for i in range(len(pages))]
    tier = DiskTier(root / "tier", 4 * total + (64 << 20), bytes(32), codec="none", io="posix",
                    protection=protection)
    keys = [p.key for p in pages]
    tier_paths = [tier._path(k) for k in keys]
    writer = ThreadPoolExecutor(4)

    def raw_write_one(args: tuple[Path, KVPage]) -> None:
        path, page = args
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.pwritev(fd, [page.data], 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def raw_read_one(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            buf = bytearray(os.fstat(fd).st_size)
            os.preadv(fd, [buf], 0)
        finally:
            os.close(fd)

    def raw_write() -> None:
        list(writer.map(raw_write_one, zip(raw_paths, pages, strict=True)))

    def raw_clear() -> None:
        for path in raw_paths:
            path.unlink(missing_ok=True)

    def timed_cold(paths: list[Path], fn: Callable[[], Any]) -> float:
        _drop_cache(paths)
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    limit_put = _median_rate(total, raw_write, repeats, raw_clear)
    put = _median_rate(total, lambda: tier.put(pages), repeats, lambda: tier.delete(keys))
    raw_t, tier_t = [], []
    for _ in range(repeats):
        raw_t.append(timed_cold(raw_paths, lambda: list(writer.map(raw_read_one, raw_paths))))
        tier_t.append(timed_cold(tier_paths, lambda: tier.get(keys)))
    writer.shutdown()
    tier.close()
    return _result(put, _gbps(total, statistics.median(tier_t)), limit_put,
                   _gbps(total, statistics.median(raw_t)))


def bench_s3(pages: list[KVPage], repeats: int, endpoint: str,
             credentials: dict[str, str]) -> dict[str, Any]:
    import boto3
    from botocore.config import Config

    total = sum(p.nbytes for p in pages)
    prefix = uuid.uuid4().hex
    tier = S3Tier(f"s3://kvext-bench/{prefix}/tier", bytes(32), endpoint=endpoint,
                  credentials=credentials, codec="none", connections=S3_CONNECTIONS,
                  op_timeout_s=120.0, read_timeout_s=60.0)
    raw = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                       config=Config(max_pool_connections=S3_CONNECTIONS), **credentials)
    pool = ThreadPoolExecutor(S3_CONNECTIONS)
    names = [f"{prefix}/raw/{i}" for i in range(len(pages))]
    keys = [p.key for p in pages]

    def raw_put() -> None:
        list(pool.map(lambda a: raw.put_object(Bucket="kvext-bench", Key=a[0], Body=a[1].data),
                      zip(names, pages, strict=True)))

    def raw_get() -> None:
        list(pool.map(lambda n: raw.get_object(Bucket="kvext-bench", Key=n)["Body"].read(),
                      names))

    limit_put = _median_rate(total, raw_put, repeats)
    put = _median_rate(total, lambda: tier.put(pages), repeats, lambda: tier.delete(keys))
    limit_get = _median_rate(total, raw_get, repeats)
    get = _median_rate(total, lambda: tier.get(keys), repeats)
    pool.shutdown()
    tier.close()
    return _result(put, get, limit_put, limit_get)


def real_kv_bytes(tokens: int = 1024) -> tuple[bytes, str]:
    """K and V of every layer of SmolLM2 (bf16) for a ``tokens``-token text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sgl_kvext.harness.demo import build_context
    from sgl_kvext.harness.model_prep import prepare_smollm2

    path = prepare_smollm2().path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    text, _ = build_context(200)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    layers = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    kv = torch.stack(layers).contiguous().view(torch.uint8).numpy().tobytes()
    return kv, f"SmolLM2-135M bf16 KV, {ids.shape[1]} tokens"


def bench_codec(kv: bytes, source: str, repeats: int) -> dict[str, Any]:
    from sgl_kvext.tiers.codec import make_codec

    codec = make_codec("zstd", level=1, width=2)
    blob = codec.encode(kv)
    comp = _median_rate(len(kv), lambda: codec.encode(kv), repeats)
    decomp = _median_rate(len(kv), lambda: codec.decode(blob, len(kv)), repeats)
    plain = make_codec("zstd", level=1, width=1).encode(kv)
    return {"source": source, "raw_bytes": len(kv), "ratio": len(kv) / len(blob),
            "ratio_unshuffled": len(kv) / len(plain), "compress_mbps": comp * 1000,
            "decompress_mbps": decomp * 1000}


def run_tier_bench(object_bytes: int, objects: int, repeats: int, work_dir: Path | None,
                   s3_endpoint: str | None, skip: set[str],
                   pool_tokens: int = 4256) -> dict[str, Any]:
    from sgl_kvext.harness.seaweedfs import SeaweedFS

    pages = _pages(objects, object_bytes, seed=0)
    out: dict[str, Any] = {"object_bytes": object_bytes, "objects": objects,
                           "repeats": repeats, "target_ratio": TARGET, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        root = Path(tmp)
        if "host" not in skip:
            out["host"] = bench_host(pages, repeats)
        if "disk" not in skip:
            out["disk"] = bench_disk(pages, repeats, root / "disk")
            # With a deployment key: keyed BLAKE2b tags in place of xxh3 (same raw limit).
            out["disk_keyed"] = bench_disk(pages, repeats, root / "disk-keyed",
                                           Protection.tagged(b"bench-object-key" * 2))
            # With an encryption key: AES-256-GCM objects (same raw limit).
            out["disk_encrypted"] = bench_disk(pages, repeats, root / "disk-encrypted",
                                               Protection.encrypted(b"bench-cipher-key" * 2))
        if "s3" not in skip:
            if s3_endpoint:
                out["s3"] = bench_s3(pages, repeats, s3_endpoint, {})
            else:
                with SeaweedFS(root / "weed", log_path=root / "weed.log") as server:
                    out["s3"] = bench_s3(pages, repeats, server.endpoint, server.credentials)
        if "codec" not in skip:
            out["codec"] = bench_codec(*real_kv_bytes(), repeats)
        if "pool" not in skip:
            from sgl_kvext_bench.pool_copy import bench_pool

            out["pool"] = bench_pool(pool_tokens, repeats)
    return out
