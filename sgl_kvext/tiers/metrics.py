"""Per-tier metrics: a wrapper tier that counts.

:class:`MeteredTier` wraps any tier and records hits, misses, bytes in and out, evictions and
latency histograms per operation; it adds the inner tier's own counters (``quarantined``...)
to :meth:`MeteredTier.snapshot`, the one source of truth that
:mod:`sgl_kvext.sglang_plugin.metrics_export` puts on SGLang's ``/metrics``.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sgl_kvext.tiers.base import EvictionSink, PutResult, Tier, TierCapabilities
from sgl_kvext.tiers.objects import KVPage, page_nbytes

if TYPE_CHECKING:
    import torch

#: Latency bucket upper bounds in seconds (Prometheus style, +Inf implied).
BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
OPERATIONS = ("get", "put", "exists", "delete")


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds


class MeteredTier(Tier):
    """A tier that records what passes through it; behaves exactly like ``inner``."""

    def __init__(self, inner: Tier) -> None:
        self.inner = inner
        self.name = inner.name
        self._lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "bytes_in": 0, "bytes_out": 0, "evictions": 0,
                        "rejected": 0}
        self._latency = {op: _Histogram() for op in OPERATIONS}

    @property
    def capabilities(self) -> TierCapabilities:
        return self.inner.capabilities

    @property      # type: ignore[override]
    def keep_evicted(self) -> bool:
        return self.inner.keep_evicted

    @keep_evicted.setter
    def keep_evicted(self, keep: bool) -> None:
        self.inner.keep_evicted = keep

    @property      # type: ignore[override]
    def eviction_sink(self) -> EvictionSink | None:
        return self.inner.eviction_sink

    @eviction_sink.setter
    def eviction_sink(self, sink: EvictionSink | None) -> None:
        self.inner.eviction_sink = sink

    def peek(self, keys: Sequence[bytes]) -> dict[bytes, KVPage]:
        return self.inner.peek(keys)     # the chain's own copies: not a hit or a miss

    @property
    def capacity_bytes(self) -> int:
        return self.inner.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self.inner.used_bytes

    def _timed(self, op: str, start: float, **counts: int) -> None:
        with self._lock:
            self._latency[op].observe(time.perf_counter() - start)
            for name, n in counts.items():
                self._counts[name] += n

    def get(self, keys: Sequence[bytes]) -> dict[bytes, KVPage]:
        start = time.perf_counter()
        out = self.inner.get(keys)
        self._timed("get", start, hits=len(out), misses=len(keys) - len(out),
                    bytes_out=sum(p.nbytes for p in out.values()))
        return out

    def read_into(self, keys: Sequence[bytes], out: Sequence[memoryview]) -> list[bool]:
        start = time.perf_counter()
        done = self.inner.read_into(keys, out)
        hits = sum(done)
        # Bytes out counts the filled buffers; callers size them to the page.
        self._timed("get", start, hits=hits, misses=len(keys) - hits,
                    bytes_out=sum(len(memoryview(o).cast("B")) for o, d in zip(out, done,
                                                                              strict=True) if d))
        return done

    def count_queued_hits(self, pages: Sequence[KVPage]) -> None:
        """``pages`` were read from this tier's write queue (see ``TierChain``): hits of
        this tier like any other; no operation ran, so no latency is observed."""
        with self._lock:
            self._counts["hits"] += len(pages)
            self._counts["bytes_out"] += sum(p.nbytes for p in pages)

    def put(self, pages: Sequence[KVPage]) -> PutResult:
        start = time.perf_counter()
        result = self.inner.put(pages)
        stored = set(result.stored)
        self._timed("put", start, bytes_in=sum(p.nbytes for p in pages if p.key in stored),
                    evictions=result.evictions, rejected=len(result.rejected))
        return result

    def read_to_device(self, keys: Sequence[bytes], out: torch.Tensor,
                       rows: Sequence[int]) -> list[bool] | None:
        start = time.perf_counter()
        done = self.inner.read_to_device(keys, out, rows)
        if done is not None:
            hits = sum(done)
            self._timed("get", start, hits=hits, misses=len(keys) - hits,
                        bytes_out=hits * int(out.shape[1]))
        return done

    def read_in_place(self, keys: Sequence[bytes], dtype: str, shape: tuple[int, ...],
                      use: Callable[[torch.Tensor, torch.Tensor], None]) -> bool:
        start = time.perf_counter()
        done = self.inner.read_in_place(keys, dtype, shape, use)
        if done:
            self._timed("get", start, hits=len(keys),
                        bytes_out=len(keys) * page_nbytes(dtype, shape))
        return done

    def put_in_place(self, keys: Sequence[bytes], dtype: str, shape: tuple[int, ...],
                     fill: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
                     ) -> PutResult | None:
        start = time.perf_counter()
        result = self.inner.put_in_place(keys, dtype, shape, fill)
        if result is not None:
            self._timed("put", start, bytes_in=page_nbytes(dtype, shape) * len(result.stored),
                        evictions=result.evictions, rejected=len(result.rejected))
        return result

    def put_from_device(self, keys: Sequence[bytes], rows: torch.Tensor, dtype: str,
                        shape: tuple[int, ...]) -> PutResult | None:
        start = time.perf_counter()
        result = self.inner.put_from_device(keys, rows, dtype, shape)
        if result is not None:
            stored = set(result.stored)
            self._timed("put", start, bytes_in=int(rows.shape[1]) * sum(k in stored for k in keys),
                        evictions=result.evictions, rejected=len(result.rejected))
        return result

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        start = time.perf_counter()
        out = self.inner.exists(keys)
        self._timed("exists", start)
        return out

    def delete(self, keys: Sequence[bytes]) -> int:
        start = time.perf_counter()
        out = self.inner.delete(keys)
        self._timed("delete", start)
        return out

    def stats(self) -> dict[str, int]:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()

    def snapshot(self) -> dict[str, Any]:
        """Plain-data view: counters, inner counters, bytes used, latency histograms."""
        with self._lock:
            latency = {op: {"buckets": list(zip((*BUCKETS, float("inf")), h.counts,
                                                strict=True)),
                            "count": sum(h.counts), "sum_s": h.total}
                       for op, h in self._latency.items()}
            counts = dict(self._counts)
        return {"tier": self.name, **counts, **self.inner.stats(),
                "used_bytes": self.used_bytes, "capacity_bytes": self.capacity_bytes,
                "latency": latency}

