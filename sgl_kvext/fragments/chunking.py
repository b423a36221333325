"""Content-defined chunking of token ids: the same chunk yields the same fragments anywhere.

A *raw boundary* falls after token ``i`` when a rolling hash of the ``WINDOW`` tokens ending at
``i`` is ``0 mod spacing``: it depends on those tokens only, never on their position. A raw
boundary is *kept* when the raw boundary before it lies at least ``min_tokens`` earlier; a
kept boundary therefore depends only on the tokens since the previous raw boundary, so once a
chunk holds one raw boundary, every later cut inside it is the same wherever the chunk sits,
whatever precedes it. Fragments are the spans between kept boundaries, each >= ``min_tokens``
(the tail after the last kept boundary is not a fragment). The hash mixes per-token values
from SplitMix64 of the token id, rotated by their offset in the window (a Gear-style hash),
so no two runs, processes or machines disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

WINDOW = 8
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class Fragment(NamedTuple):
    """Tokens ``[start, end)`` of the chunked sequence."""

    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    if r == 0:
        return x
    return ((x << np.uint64(r)) | (x >> np.uint64(64 - r))) & _M64


def window_hashes(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Hash of the ``WINDOW`` tokens ending at each position (uint64, shape (n,)).

    Positions ``< WINDOW - 1`` have no full window and hash to a value that never cuts."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be one-dimensional, got shape {ids.shape}")
    g = _splitmix64(ids)
    n = ids.shape[0]
    h = np.zeros(n, dtype=np.uint64)
    for back in range(min(WINDOW, n)):  # token i-back contributes rotl(g, back)
        h[back:] ^= _rotl(g[:n - back] if back else g, back)
    h[:WINDOW - 1] = np.uint64(1)       # odd: never 0 mod an even spacing, see boundaries()
    return h


def boundaries(token_ids: Sequence[int] | np.ndarray, min_tokens: int,
               spacing: int | None = None) -> list[int]:
    """Kept cut points (a cut at ``i`` splits before token ``i``), ascending.

    Parameters
    ----------
    token_ids : (n,) ints
    min_tokens
        Smallest fragment; also the least distance between kept cuts.
    spacing
        Mean distance between raw boundaries, even (default ``min_tokens`` rounded up to even,
        which minimizes the mean fragment length at about ``2.7 * min_tokens``: a raw gap is
        ``>= min_tokens`` with probability ``1/e``). Measured on 500-token chunks in shuffled
        order: 88% of their tokens are reused at ``min_tokens`` 16, 78% at 32, 57% at 64; the
        rest are the cut-off ends of each chunk.
    """
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
    spacing = spacing if spacing is not None else max(2, min_tokens + (min_tokens & 1))
    if spacing < 2 or spacing % 2:
        raise ValueError(f"spacing must be an even number >= 2, got {spacing}")
    h = window_hashes(token_ids)
    raw = (np.flatnonzero(h % np.uint64(spacing) == 0) + 1).tolist()   # cut after token i
    kept = []
    prev = None
    for cut in raw:
        if prev is not None and cut - prev >= min_tokens:
            kept.append(cut)
        prev = cut
    return kept


def fragments(token_ids: Sequence[int] | np.ndarray, min_tokens: int,
              spacing: int | None = None) -> list[Fragment]:
    """The fragments of ``token_ids``: spans between consecutive kept cuts (see module doc)."""
    cuts = boundaries(token_ids, min_tokens, spacing)
    return [Fragment(a, b) for a, b in zip(cuts, cuts[1:], strict=False)]
