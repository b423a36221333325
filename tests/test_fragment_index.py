"""Fragment index: marked spans before automatic chunks, known keys as a bounded LRU set,
marked chunk texts located in a prompt."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from sgl_kvext.fragments.index import FragmentIndex, FragmentMatch, locate_chunks, marked_core


def key_of(tokens: np.ndarray) -> bytes:
    return hashlib.blake2b(tokens.astype("<i8").tobytes(), digest_size=16).digest()


def prompt(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 49_152, 3000)


def test_marked_spans_win_and_nothing_overlaps() -> None:
    ids = prompt()
    found = FragmentIndex(16).find(key_of, ids, explicit=[(500, 900), (100, 300)]).matches
    spans = [(m.start, m.end) for m in found]
    assert (100, 300) in spans and (500, 900) in spans
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert len(spans) > 10                                   # automatic chunks elsewhere
    assert all(m.key == key_of(ids[m.start:m.end]) for m in found)


def spans_of(found: list[FragmentMatch]) -> list[tuple[int, int]]:
    return [(m.start, m.end) for m in found]


def test_modes_and_the_start_bound() -> None:
    ids = prompt(1)
    marked = [(200, 400)]
    assert spans_of(FragmentIndex(16, "explicit").find(key_of, ids, marked).matches) \
        == [(200, 400)]
    auto = FragmentIndex(16, "auto").find(key_of, ids, marked).matches
    assert (200, 400) not in spans_of(auto) and auto and not any(m.marked for m in auto)
    later = FragmentIndex(16).find(key_of, ids, marked, from_token=1000)
    assert later.matches and all(m.start >= 1000 for m in later.matches)
    assert later.marked_in_prefix == 1
    # Out of range, too short or overlapping marks are dropped, each with its reason.
    odd = [(2990, 3100), (50, 51), (60, 200), (100, 150)]
    found = FragmentIndex(16, "explicit").find(key_of, ids, odd)
    assert spans_of(found.matches) == [(60, 200)]
    assert sorted(d.reason for d in found.dropped) == [
        "overlaps an earlier marked span", "past the end of the prompt", "shorter than 2 tokens"]


def test_a_marked_span_straddling_the_cached_prefix_is_kept_whole() -> None:
    # The device prefix ends inside a marked document (its first tokens are shared with an
    # earlier prompt): the mark is kept under its whole key, and automatic chunks never
    # stand in for any part of it.
    ids = prompt(3)
    found = FragmentIndex(16).find(key_of, ids, [(300, 700), (900, 1200)], from_token=310)
    marked = [m for m in found.matches if m.marked]
    assert spans_of(marked) == [(300, 700), (900, 1200)]
    assert marked[0].key == key_of(ids[300:700])
    auto = [m for m in found.matches if not m.marked]
    assert auto and all(m.start >= 310 for m in auto)
    assert not any(m.start < 700 and 300 < m.end for m in auto)
    assert not found.dropped and found.marked_in_prefix == 0


def test_known_keys_are_a_bounded_lru() -> None:
    index = FragmentIndex(16, capacity=2)
    index.add(b"a")
    index.add(b"b")
    assert index.known(b"a")          # touches a: b is now the oldest
    index.add(b"c")
    assert index.known(b"a") and index.known(b"c") and not index.known(b"b")
    index.discard([b"a"])
    assert not index.known(b"a") and len(index) == 1


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="chunking"):
        FragmentIndex(16, "sometimes")
    with pytest.raises(ValueError, match="min_tokens"):
        FragmentIndex(0)


def test_locate_chunks_finds_the_cores_of_texts_whose_ends_merged() -> None:
    ids = prompt(2)
    chunk_a, chunk_b = ids[100:180], ids[700:800]
    merged = np.concatenate([[7], ids[1200:1290], [9]])      # ends tokenized differently
    spans = locate_chunks(ids, [chunk_b, chunk_a, merged, np.array([1, 2, 3])])
    assert spans == [(701, 799), (101, 179), (1200, 1290)]   # cores; too short: left out
    assert np.array_equal(marked_core(chunk_a), ids[101:179])
    assert marked_core([1, 2, 3]).size == 0


def test_a_prompt_matched_again_is_not_chunked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # A queued request is matched on every scheduler pass; its automatic cuts are remembered
    # for the last CUTS_MEMO prompts (by their bytes) and give the same fragments.
    from sgl_kvext.fragments import index as index_module

    calls: list[int] = []
    real = index_module.fragments

    def counting(ids: np.ndarray, min_tokens: int) -> list:  # type: ignore[type-arg]
        calls.append(int(ids.size))
        return real(ids, min_tokens)

    monkeypatch.setattr(index_module, "fragments", counting)
    index, ids = FragmentIndex(16, "auto"), prompt(3)
    first = index.find(key_of, ids).matches
    assert index.find(key_of, ids.copy()).matches == first and len(calls) == 1
    assert first == FragmentIndex(16, "auto").find(key_of, ids, from_token=0).matches
    for seed in range(100, 100 + index_module.CUTS_MEMO):      # the first prompt is forgotten
        index.find(key_of, prompt(seed)[:200])
    index.find(key_of, ids)
    assert len(calls) == 3 + index_module.CUTS_MEMO        # 2 above, CUTS_MEMO, and this one
