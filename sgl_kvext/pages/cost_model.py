"""When is waiting for a tier load better than recomputing? Measured speeds decide.

Both speeds are exponential moving averages of what this process observed: prefill
throughput (tokens computed / seconds, from finished prefills) and per-tier load bandwidth
(bytes delivered / seconds, from prefetches). Until a first observation, device- and
tier-typical guesses stand in.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

#: Starting guesses (bytes/s) by tier name, replaced by measurements as loads happen.
TIER_GUESS = {"host": 5e9, "disk": 2e8, "s3": 5e7}   # delivered (read + decode + promote)
PREFILL_GUESS = {"cpu": 500.0, "cuda": 10_000.0}


class CostModel:
    """Prefill and tier-load speed estimates.

    Parameters
    ----------
    tier_names
        Tier names, fastest first (``host``, ``disk``, ``s3``).
    device
        ``cpu`` or ``cuda``: picks the starting prefill guess.
    alpha
        Weight of a new observation in the moving averages.
    """

    def __init__(self, tier_names: Sequence[str], device: str = "cpu", alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.prefill_tps = PREFILL_GUESS.get(device, PREFILL_GUESS["cpu"])
        self.tier_bps = [TIER_GUESS.get(name, 5e7) for name in tier_names]
        self.samples = {"prefill": 0, "load": 0}
        self._lock = threading.Lock()

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens < 32 or seconds <= 0:   # tiny prefills measure overheads, not throughput
            return
        with self._lock:
            self.prefill_tps = self._blend(self.prefill_tps, tokens / seconds,
                                           self.samples["prefill"])
            self.samples["prefill"] += 1

    def observe_load(self, tier: int, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or seconds <= 0 or not 0 <= tier < len(self.tier_bps):
            return
        with self._lock:
            self.tier_bps[tier] = self._blend(self.tier_bps[tier], nbytes / seconds,
                                              self.samples["load"])
            self.samples["load"] += 1

    def _blend(self, old: float, new: float, seen: int) -> float:
        return new if seen == 0 else (1 - self.alpha) * old + self.alpha * new

    def recompute_s(self, tokens: int) -> float:
        return max(tokens, 0) / self.prefill_tps

    def load_s(self, nbytes: int, tier: int) -> float:
        return max(nbytes, 0) / self.tier_bps[min(tier, len(self.tier_bps) - 1)]

    def hold_budget_s(self, tokens: int, bytes_per_token: float, cap_s: float,
                      tier: int | None = None, local: bool = False) -> float:
        """How long a request may wait for ``tokens`` to arrive from ``tier`` (by default the
        slowest).

        Zero when loading them is not expected to beat recomputing them; otherwise three
        times the expected load time plus 0.25 s (a prefetch also queues, looks up and
        promotes), never more than recomputing would take. From a ``local`` tier (disk: a
        read that cannot stall like a remote call) the wait may last as long as recomputing:
        the first reads of a cold disk run well below the speed measured so far.
        """
        recompute = self.recompute_s(tokens)
        tier = len(self.tier_bps) - 1 if tier is None else tier
        load = self.load_s(int(tokens * bytes_per_token), tier)
        if load >= recompute:
            return 0.0
        return min(cap_s, recompute, recompute if local else 3 * load + 0.25)
