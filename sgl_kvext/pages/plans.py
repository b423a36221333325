"""What the tiering decides for a waiting request: :class:`LoadPlan`, :class:`Hold` or
:class:`Miss`; and what a load did (:class:`LoadOutcome`)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from sgl_kvext.pages.read_ahead import NOTHING
from sgl_kvext.tiers.objects import KVPage


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """Pages ``keys`` hold tokens ``[first_page * T, ...)``; tokens ``[start, end)`` are new.
    ``tiers[i]`` is the chain index of the local tier ``keys[i]`` was found in (0 for a page
    in ``ahead``: read ahead for this request, :mod:`~sgl_kvext.pages.read_ahead`);
    ``sources[i]`` the tier it came from for this request (for a page read ahead, the tier
    the prefetch read it from: S3, say; else ``tiers[i]``)."""

    keys: tuple[bytes, ...]
    first_page: int
    start: int
    end: int
    tiers: tuple[int, ...]
    sources: tuple[int, ...]
    ahead: Mapping[bytes, KVPage] = field(default_factory=lambda: NOTHING, compare=False)

    def __post_init__(self) -> None:
        if not len(self.tiers) == len(self.sources) == len(self.keys):
            raise ValueError(f"{len(self.tiers)} tiers and {len(self.sources)} sources for "
                             f"{len(self.keys)} pages")

    @property
    def tokens(self) -> int:
        return self.end - self.start

    def tokens_by_source(self, page_tokens: int) -> dict[int, int]:
        """New tokens (``[start, end)``) per source tier; pages are ``page_tokens`` long
        (the last may be a partial one)."""
        out: dict[int, int] = {}
        for i, source in enumerate(self.sources):
            lo = max(self.start, (self.first_page + i) * page_tokens)
            hi = min(self.end, (self.first_page + i + 1) * page_tokens)
            if hi > lo:
                out[source] = out.get(source, 0) + hi - lo
        return out


@dataclass(frozen=True, slots=True)
class Hold:
    """Keep the request waiting: a prefetch of its pages is running and waiting is still
    expected to beat recomputing. ``tokens`` is the host hit to report meanwhile (SGLang asks
    the tree again only about a request it believes has one)."""

    tokens: int


@dataclass(frozen=True, slots=True)
class Miss:
    """Nothing to load now: the device match is all the tiers can give."""


MISS = Miss()


class LoadOutcome(enum.Enum):
    """What :meth:`KVTiering.load <sgl_kvext.pages.tiering.KVTiering.load>` did."""

    LOADED = "loaded"    # every planned token is in the slots
    MISSING = "missing"  # a page is in no local tier any more: recompute it
    MOVED = "moved"      # pages moved below their planned tier, too many to read on the
    #                      scheduler thread (DIRECT_READ_S): plan the request again
