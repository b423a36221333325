"""sgl-kvext counters on SGLang's ``/metrics`` (``--enable-metrics``).

SGLang serves ``/metrics`` from its HTTP process through prometheus_client's multiprocess
mode, so metrics must be plain Counters / Gauges created in the scheduler process (a custom
collector there would not be seen). A daemon thread copies the counters of the tiers, the tier
chain, the page tiering, the prefetcher and the fragment blender into them every
``--kvext-metrics-interval`` seconds (1 by default; as deltas), so each keeps its own
counters as the one source of truth. This is the only way sgl-kvext metrics leave the
process; every counter named below is on ``/metrics`` (``tests/test_metrics_export.py``).

Names: ``kvext_tier_<counter>_total{tier}``, ``kvext_tier_used_bytes`` /
``kvext_tier_capacity_bytes{tier}``, ``kvext_tier_op_seconds_total`` / ``kvext_tier_ops_total
{tier, op}`` (latency sum and count per operation), ``kvext_chain_<counter>_total``,
``kvext_<tiering counter>_total``, ``kvext_prefetch_<counter>_total``,
``kvext_fragment_<counter>_total``; every one also labelled ``tp_rank``.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from sgl_kvext.fragments.blender import FragmentBlender
from sgl_kvext.pages.tiering import KVTiering
from sgl_kvext.tiers.metrics import MeteredTier

TIER_COUNTERS = ("hits", "misses", "bytes_in", "bytes_out", "evictions", "rejected",
                 "quarantined", "errors", "timeouts")
TIERING_COUNTERS = ("spilled_pages", "loaded_pages", "failed_loads", "streamed_pages",
                    "ahead_pages", "hold_timeouts", "moved_loads")
PREFETCH_COUNTERS = ("started", "dropped", "promoted_pages")
CHAIN_COUNTERS = ("dropped_pages", "demoted_pages", "promoted_pages")
FRAGMENT_COUNTERS = ("blends", "fragment_hits", "fragment_misses", "blended_tokens",
                     "recomputed_tokens", "registered", "found_stored", "register_dropped",
                     "register_failed", "seen_once", "close_calls")


class MetricsExporter:
    """Copies sgl-kvext's counters onto prometheus_client metrics every ``interval_s``."""

    def __init__(self, tiering: KVTiering, tp_rank: int, blender: FragmentBlender | None = None,
                 interval_s: float = 1.0, registry: CollectorRegistry = REGISTRY) -> None:
        self.tiering, self.rank, self.interval_s = tiering, str(tp_rank), interval_s
        self.blender = blender

        def counter(name: str, what: str, *labels: str) -> Counter:
            return Counter(name, f"sgl-kvext {what}", [*labels, "tp_rank"], registry=registry)

        def gauge(name: str, what: str) -> Gauge:
            return Gauge(name, f"sgl-kvext {what}", ["tier", "tp_rank"], registry=registry,
                         multiprocess_mode="livemostrecent")

        self._tier = {n: counter(f"kvext_tier_{n}", f"tier {n}", "tier") for n in TIER_COUNTERS}
        self._used = gauge("kvext_tier_used_bytes", "bytes held per tier")
        self._capacity = gauge("kvext_tier_capacity_bytes", "capacity per tier")
        self._op_seconds = counter("kvext_tier_op_seconds", "seconds per tier operation", "tier",
                                   "op")
        self._ops = counter("kvext_tier_ops", "tier operations", "tier", "op")
        self._chain = {n: counter(f"kvext_chain_{n}", f"tier chain {n}") for n in CHAIN_COUNTERS}
        self._flow = {n: counter(f"kvext_{n}", n.replace("_", " ")) for n in TIERING_COUNTERS}
        self._prefetch = {n: counter(f"kvext_prefetch_{n}", f"prefetch {n}")
                          for n in PREFETCH_COUNTERS}
        self._fragment = {n: counter(f"kvext_fragment_{n}", f"fragment blend {n}")
                          for n in FRAGMENT_COUNTERS}
        self._last: dict[tuple[str, ...], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvext-metrics", daemon=True)
        self._thread.start()

    def _inc(self, counter: Any, key: tuple[str, ...], value: float, *labels: str) -> None:
        delta = value - self._last.get(key, 0)
        child = counter.labels(*labels)         # exported from the first sync, zero included
        if delta > 0:
            child.inc(delta)
        self._last[key] = value

    def sync(self) -> None:
        for tier in self.tiering.chain.tiers:
            snap: dict[str, Any] = tier.snapshot() if isinstance(tier, MeteredTier) else {}
            for name in TIER_COUNTERS:
                self._inc(self._tier[name], (tier.name, name), int(snap.get(name, 0)),
                          tier.name, self.rank)
            self._used.labels(tier.name, self.rank).set(tier.used_bytes)
            self._capacity.labels(tier.name, self.rank).set(tier.capacity_bytes)
            for op, h in snap.get("latency", {}).items():
                self._inc(self._op_seconds, (tier.name, op, "s"), h["sum_s"], tier.name, op,
                          self.rank)
                self._inc(self._ops, (tier.name, op, "n"), h["count"], tier.name, op, self.rank)
        for name in CHAIN_COUNTERS:
            self._inc(self._chain[name], ("chain", name), self.tiering.chain.counters[name],
                      self.rank)
        for name in TIERING_COUNTERS:
            self._inc(self._flow[name], ("flow", name), self.tiering.counters[name], self.rank)
        for name in PREFETCH_COUNTERS:
            self._inc(self._prefetch[name], ("prefetch", name),
                      self.tiering.prefetcher.counters[name], self.rank)
        if self.blender is not None:
            for name in FRAGMENT_COUNTERS:
                self._inc(self._fragment[name], ("fragment", name),
                          self.blender.counters[name], self.rank)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sync()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sync()
