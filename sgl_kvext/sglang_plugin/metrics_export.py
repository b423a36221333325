"""sgl-kvext counters on SGLang's ``/metrics`` (``--enable-metrics``).

SGLang serves ``/metrics`` from its HTTP process through prometheus_client's multiprocess
mode, so metrics must be plain Counters / Gauges created in the scheduler process (a custom
collector there would not be seen). A daemon thread copies the tiers' own counters into them
once a second (as deltas), so the tiers keep one source of truth.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import Counter, Gauge

from sgl_kvext.fragments.blender import FragmentBlender
from sgl_kvext.pages.tiering import KVTiering

TIER_COUNTERS = ("hits", "misses", "bytes_in", "bytes_out", "evictions", "rejected",
                 "quarantined", "errors", "timeouts")
TIERING_COUNTERS = ("spilled_pages", "loaded_pages", "failed_loads")
PREFETCH_COUNTERS = ("started", "dropped", "promoted_pages")
FRAGMENT_COUNTERS = ("blends", "fragment_hits", "fragment_misses", "blended_tokens",
                     "recomputed_tokens", "registered", "found_stored", "register_dropped",
                     "register_failed")


class MetricsExporter:
    def __init__(self, tiering: KVTiering, tp_rank: int, blender: FragmentBlender | None = None,
                 interval_s: float = 1.0) -> None:
        self.tiering, self.rank, self.interval_s = tiering, str(tp_rank), interval_s
        self.blender = blender
        self._fragment = {n: Counter(f"kvext_fragment_{n}", f"sgl-kvext fragment blend {n}",
                                     ["tp_rank"]) for n in FRAGMENT_COUNTERS}
        self._tier = {n: Counter(f"kvext_tier_{n}", f"sgl-kvext tier {n}", ["tier", "tp_rank"])
                      for n in TIER_COUNTERS}
        self._used = Gauge("kvext_tier_used_bytes", "sgl-kvext bytes held per tier",
                           ["tier", "tp_rank"], multiprocess_mode="livemostrecent")
        self._flow = {n: Counter(f"kvext_{n}", f"sgl-kvext {n.replace('_', ' ')}", ["tp_rank"])
                      for n in TIERING_COUNTERS}
        self._prefetch = {n: Counter(f"kvext_prefetch_{n}", f"sgl-kvext prefetch {n}",
                                     ["tp_rank"]) for n in PREFETCH_COUNTERS}
        self._last: dict[tuple[str, ...], int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvext-metrics", daemon=True)
        self._thread.start()

    def _inc(self, counter: Any, key: tuple[str, ...], value: int, *labels: str) -> None:
        delta = value - self._last.get(key, 0)
        if delta > 0:
            counter.labels(*labels).inc(delta)
        self._last[key] = value

    def sync(self) -> None:
        for tier in self.tiering.chain.tiers:
            snap = tier.snapshot() if hasattr(tier, "snapshot") else {"tier": tier.name}
            for name in TIER_COUNTERS:
                self._inc(self._tier[name], (tier.name, name), int(snap.get(name, 0)),
                          tier.name, self.rank)
            self._used.labels(tier.name, self.rank).set(tier.used_bytes)
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
