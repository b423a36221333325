"""Content-defined chunking: the same chunk yields the same fragments at any offset, after any
other chunks, with any text before it."""

from __future__ import annotations

import numpy as np
import pytest

from sgl_kvext.fragments import chunking
from sgl_kvext.fragments.chunking import WINDOW, boundaries, fragments, window_hashes


def tokens(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 49_152, n)


def inside(seq: np.ndarray, start: int, end: int, min_tokens: int) -> list[bytes]:
    """Token strings of the fragments of ``seq`` lying within ``[start, end)``, in order."""
    return [seq[f.start:f.end].tobytes() for f in fragments(seq, min_tokens)
            if start <= f.start and f.end <= end]


def test_fragments_are_long_enough_contiguous_and_deterministic() -> None:
    seq = tokens(np.random.default_rng(0), 5000)
    frags = fragments(seq, 32)
    assert frags == fragments(list(seq), 32)
    assert frags and all(len(f) >= 32 for f in frags)
    assert all(a.end == b.start for a, b in zip(frags, frags[1:], strict=False))
    assert 40 < np.mean([len(f) for f in frags]) < 200       # about 2.7 * min_tokens
    assert [f.start for f in frags] + [frags[-1].end] == boundaries(seq, 32)


@pytest.mark.parametrize("seed", range(6))
def test_chunk_yields_the_same_fragments_wherever_it_sits(seed: int) -> None:
    rng = np.random.default_rng(seed)
    chunk = tokens(rng, 600)
    others = [tokens(rng, int(rng.integers(200, 700))) for _ in range(3)]
    placements = [
        np.concatenate([chunk, others[0]]),                                  # at offset 0
        np.concatenate([others[0], chunk, others[1]]),                       # after a chunk
        np.concatenate([tokens(rng, 37), others[2], others[1], chunk]),     # text, then two
    ]
    starts = [0, len(others[0]), 37 + len(others[2]) + len(others[1])]
    found = [inside(seq, s, s + len(chunk), 16) for seq, s in zip(placements, starts,
                                                                   strict=True)]
    # Only the first fragment of the chunk may depend on what precedes it.
    common = set(found[0][1:])
    for other in found[1:]:
        assert common <= set(other)
    reused = sum(len(f) for f in common) // 8      # bytes of int64 tokens -> tokens
    assert reused >= 0.5 * len(chunk)


@pytest.mark.parametrize("n", [0, WINDOW - 1, WINDOW, WINDOW + 1, 700, chunking.SCALAR_MAX + 1])
def test_plain_python_hashing_cuts_where_numpy_does(n: int) -> None:
    # The scheduler thread hashes prompts up to SCALAR_MAX tokens in plain Python (no GIL
    # hand-offs); keys must not depend on which way a text was hashed.
    ids = np.random.default_rng(n).integers(-3, 200_000, n)      # any int64 token id
    for spacing in (2, 16, 32):
        numpy_cuts = (np.flatnonzero(window_hashes(ids) % np.uint64(spacing) == 0) + 1)
        assert chunking._raw_cuts_scalar(ids, spacing) == numpy_cuts.tolist()


def test_window_hash_is_local() -> None:
    rng = np.random.default_rng(1)
    a, b, mid = tokens(rng, 50), tokens(rng, 80), tokens(rng, 40)
    ha = window_hashes(np.concatenate([a, mid]))[len(a) + WINDOW - 1:]
    hb = window_hashes(np.concatenate([b, mid]))[len(b) + WINDOW - 1:]
    assert np.array_equal(ha, hb)


def test_short_or_repetitive_input_has_no_fragment_rather_than_a_bad_one() -> None:
    assert fragments([], 16) == []
    assert fragments(list(range(10)), 16) == []
    for n in range(1, WINDOW + 2):                   # shorter than the hash window
        assert fragments(list(range(n)), 1) == [] and len(window_hashes(list(range(n)))) == n
    assert fragments([7] * 1000, 16) == []    # constant hash: no cut or every token a cut


@pytest.mark.parametrize(("min_tokens", "spacing", "message"), [
    (0, None, "min_tokens"), (16, 3, "spacing"), (16, 0, "spacing")])
def test_bad_parameters_are_refused(min_tokens: int, spacing: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        boundaries(list(range(100)), min_tokens, spacing)
