"""The fragment index: which fragments of a prompt have stored KV, by position-independent key.

Fragments come from two sources: *explicit* spans a request marks (its RAG chunks) and
*automatic* content-defined chunks (:mod:`sgl_kvext.fragments.chunking`). Explicit spans win
where they overlap automatic ones. The index remembers the keys whose KV is stored (a bounded
LRU set, fed by registration and pre-warming); it computes keys through the function it is
given, so it knows nothing of namespaces or tiers.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np

from sgl_kvext.fragments.chunking import Fragment, fragments
from sgl_kvext.pages.recent_keys import RecentKeys

CHUNKING_MODES = ("explicit", "auto", "both")
#: Prompts whose automatic cuts are remembered: a request waiting in the queue is matched again
#: on every scheduler pass, and each chunking is ~30 numpy calls, each a point where the
#: scheduler thread hands the GIL to another thread and waits to get it back.
CUTS_MEMO = 64


class FragmentMatch(NamedTuple):
    """Tokens ``[start, end)`` of the prompt form a fragment whose key is ``key``.

    ``marked``: a span the request marked (else an automatic chunk). A marked fragment may
    start inside the cached prefix; the caller then reuses only its part after the prefix."""

    start: int
    end: int
    key: bytes
    marked: bool = False


class DroppedMark(NamedTuple):
    """A marked span ``[start, end)`` that yields no fragment, and why (a short phrase)."""

    start: int
    end: int
    reason: str


class PromptFragments(NamedTuple):
    """What :meth:`FragmentIndex.find` found: fragments in prompt order, marked spans it
    could not use, and how many marked spans lie wholly inside the cached prefix."""

    matches: list[FragmentMatch]
    dropped: list[DroppedMark]
    marked_in_prefix: int


class FragmentIndex:
    """Known fragment keys and the fragments of a prompt.

    Parameters
    ----------
    min_tokens
        Smallest automatic fragment (explicit spans may be shorter, down to 2 tokens).
    chunking
        ``explicit``, ``auto`` or ``both``.
    capacity
        Keys remembered; the least recently used are forgotten first (their KV stays in the
        tiers and is found again when re-registered or pre-warmed).
    """

    def __init__(self, min_tokens: int, chunking: str = "both", capacity: int = 1 << 16) -> None:
        if chunking not in CHUNKING_MODES:
            raise ValueError(f"chunking {chunking!r}: allowed {', '.join(CHUNKING_MODES)}")
        if min_tokens < 1 or capacity < 1:
            raise ValueError("min_tokens and capacity must be >= 1")
        self.min_tokens, self.chunking, self.capacity = min_tokens, chunking, capacity
        self._known = RecentKeys(capacity)
        self._cuts: OrderedDict[bytes, list[Fragment]] = OrderedDict()   # prompt -> fragments
        self._cuts_lock = threading.Lock()

    def find(self, key_of: Callable[[np.ndarray], bytes], tokens: Sequence[int] | np.ndarray,
             explicit: Sequence[tuple[int, int]] = (), from_token: int = 0) -> PromptFragments:
        """Non-overlapping fragments of ``tokens`` that end after ``from_token``.

        Parameters
        ----------
        key_of
            Fragment tokens (n,) -> key (the caller's namespace).
        tokens : (n,) ints
            The whole prompt (automatic cuts need the tokens before ``from_token`` too).
        explicit
            Marked ``(start, end)`` spans. A marked span that starts before ``from_token``
            and ends after it is kept whole (its key is its whole token run; the caller
            reuses the part after ``from_token``). Spans out of range, shorter than 2 tokens
            or overlapping an earlier one are dropped, with the reason. Automatic chunks never
            overlap a marked span, used or not: they never stand in for one.
        from_token
            Tokens before it are cached already (the device prefix).
        """
        ids = np.asarray(tokens, dtype=np.int64)
        marks: list[tuple[int, int]] = []
        dropped: list[DroppedMark] = []
        if self.chunking in ("explicit", "both"):
            for start, end in sorted(set(explicit)):
                reason = ("shorter than 2 tokens" if end - start < 2 else
                          "past the end of the prompt" if end > ids.size else
                          "overlaps an earlier marked span" if marks and start < marks[-1][1]
                          else "")
                if reason:
                    dropped.append(DroppedMark(start, end, reason))
                else:
                    marks.append((start, end))
        in_prefix = sum(end <= from_token for _, end in marks)
        found = [FragmentMatch(s, e, key_of(ids[s:e]), True) for s, e in marks if e > from_token]
        if self.chunking in ("auto", "both"):
            found += [FragmentMatch(f.start, f.end, key_of(ids[f.start:f.end]))
                      for f in self._fragments(ids)
                      if f.start >= from_token
                      and not any(f.start < e and s < f.end for s, e in marks)]
        found.sort()
        return PromptFragments(found, dropped, in_prefix)

    def _fragments(self, ids: np.ndarray) -> list[Fragment]:
        """The automatic fragments of ``ids``, remembered for the last :data:`CUTS_MEMO`
        prompts (keyed by their bytes: equal prompts only, never a hash collision)."""
        raw = ids.tobytes()
        with self._cuts_lock:
            cuts = self._cuts.get(raw)
            if cuts is not None:
                self._cuts.move_to_end(raw)
                return cuts
        cuts = fragments(ids, self.min_tokens)
        with self._cuts_lock:
            self._cuts[raw] = cuts
            if len(self._cuts) > CUTS_MEMO:
                self._cuts.popitem(last=False)
        return cuts

    def known(self, key: bytes) -> bool:
        return self._known.seen(key)

    def add(self, key: bytes) -> None:
        self._known.add((key,))

    def discard(self, keys: Iterable[bytes]) -> None:
        """Forget keys whose KV turned out missing (evicted, corrupt)."""
        self._known.discard(keys)

    def __len__(self) -> int:
        return len(self._known)


def marked_core(chunk: Sequence[int] | np.ndarray) -> np.ndarray:
    """The part of a marked chunk that is its fragment: its tokens without the first and the
    last. A chunk tokenized on its own may differ from the prompt's tokens at its two ends
    (BPE merges across the boundary); the core is the same in both, so a pre-warmed chunk and
    the same chunk marked in a prompt share one key. Chunks under 4 tokens have no core."""
    ids = np.asarray(chunk, dtype=np.int64)
    return ids[1:-1] if ids.size >= 4 else ids[:0]


def locate_chunks(tokens: Sequence[int] | np.ndarray,
                  chunks: Sequence[Sequence[int] | np.ndarray]) -> list[tuple[int, int]]:
    """Spans ``(start, end)`` where each chunk's :func:`marked_core` occurs in ``tokens`` (the
    first occurrence after the previous chunk's, else anywhere); chunks not found are left
    out."""
    hay = np.asarray(tokens, dtype=np.int64).astype("<i8").tobytes()
    spans: list[tuple[int, int]] = []
    after = 0
    for chunk in chunks:
        core = marked_core(chunk)
        if core.size == 0:
            continue
        pat = core.astype("<i8").tobytes()
        at = _find_aligned(hay, pat, after)
        if at < 0:
            at = _find_aligned(hay, pat, 0)
        if at >= 0:
            spans.append((at, at + int(core.size)))
            after = at + int(core.size)
    return spans


def _find_aligned(hay: bytes, pat: bytes, start_token: int) -> int:
    """Token index of ``pat`` in ``hay`` (8-byte tokens) at or after ``start_token``; -1 if
    absent (private: the public result is the list of spans)."""
    at = hay.find(pat, start_token * 8)
    while at != -1 and at % 8:
        at = hay.find(pat, at + 1)
    return -1 if at == -1 else at // 8
