"""What a fragment blend did for one request, as the server reports it.

Every request in the blend namespace gets a :class:`BlendReport` in its response
(``meta_info["kvext_blend"][0]``, a plain dict): whether its prompt was blended, which marked
spans were used (whole, or the part after the cached prefix) and which were dropped and why,
how many automatic fragments stood beside them, and how many prompt tokens came from stored
KV versus a recomputation. The benchmarks tabulate it.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from sgl_kvext.fragments.index import DroppedMark


class Outcome(enum.Enum):
    """How a request's blend ended."""

    BLENDED = "blended"
    NOTHING_STORED = "no stored fragment after the cached prefix"
    LITTLE_REUSE = "stored fragments cover too little of the span"
    FRAGMENTS_MISSING = "no fragment's KV could be fetched"
    FAILED = "the blend failed; computed in full"
    DECLINED = "not admitted as planned (the tree or the pool changed); computed in full"
    PAGES = "the tiers hold the span's KV as pages (loaded, or coming up): not blended"
    CLOSE_CALL = ("the blended first token was a close call (entropy above the gate): "
                  "computed in full")


@dataclasses.dataclass(frozen=True, slots=True)
class BlendSeconds:
    """Where one blend's time went, on the scheduler thread: reading the cached prefix's KV
    out of the pool, fetching the fragments' KV from the tiers, placing it (re-rotation), the
    layers up to the check layer over every span token, the later layers over the selected
    tokens, and writing the span's KV into the pool."""

    prefix: float = 0.0
    fetch: float = 0.0
    place: float = 0.0
    check_layers: float = 0.0
    later_layers: float = 0.0
    write: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class BlendReport:
    """One request's blend (see the module doc); token counts are prompt tokens.

    ``start`` / ``end``: the blended span (``start`` = tokens cached before it);
    ``marked_partial``: marked spans used whose head lay in the cached prefix;
    ``marked_in_prefix``: marked spans wholly inside the cached prefix (exact KV already);
    ``reused_tokens``: span tokens that came with stored KV;
    ``recomputed_tokens``: span tokens computed in every layer (those without stored KV, the
    ones the check layer selected, and the span's last token);
    ``first_token_entropy``: nats, of the blended first-token distribution (a blend that
    ran; above the gate the span is computed in full, :data:`Outcome.CLOSE_CALL`);
    ``seconds``: wall time per step of a blend that ran (:class:`BlendSeconds`)."""

    outcome: Outcome
    start: int = 0
    end: int = 0
    marked_used: int = 0
    marked_partial: int = 0
    marked_in_prefix: int = 0
    marked_dropped: tuple[DroppedMark, ...] = ()
    auto_used: int = 0
    fragments_missing: int = 0
    reused_tokens: int = 0
    recomputed_tokens: int = 0
    first_token_entropy: float | None = None
    seconds: BlendSeconds | None = None

    def but(self, **changes: Any) -> BlendReport:
        """A copy with ``changes`` (e.g. the outcome once the blend ran)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (the outcome by name, dropped spans as ``[start, end, reason]``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["outcome"] = self.outcome.name.lower()
        out["marked_dropped"] = [list(d) for d in self.marked_dropped]
        out["seconds"] = dataclasses.asdict(self.seconds) if self.seconds else None
        return out
