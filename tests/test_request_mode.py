"""Hostile request-side input, fuzzed: fragment options either parse into well-typed values
or raise ValueError (the tokenizer hook turns it into HTTP 400), never anything else; chunk
location only ever names spans that hold the chunk's tokens."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_kvext.fragments.index import locate_chunks, marked_core
from sgl_kvext.sglang_plugin.request_mode import MAX_MARKS, MAX_POSITION, FragmentOptions

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=6)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=20)
KEYS = st.sampled_from(["kvext_exact", "kvext_chunks", "kvext_chunk_spans", "kvext_other",
                        "temperature"])


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(KEYS, JSON | st.lists(st.integers(-5, 50), max_size=12), max_size=3)
       | JSON)
def test_options_parse_or_raise_value_error(params: Any) -> None:
    try:
        options = FragmentOptions(params)
    except ValueError as exc:
        assert str(exc).startswith("custom_params") and "\n" not in str(exc)
        return
    assert isinstance(options.exact, bool)
    assert all(isinstance(c, str) and c for c in options.chunks)
    assert len(options.chunks) + len(options.spans) <= MAX_MARKS
    assert all(0 <= s < e <= MAX_POSITION for s, e in options.spans)


@pytest.mark.parametrize("params, needle", [
    ({"kvext_chunk": ["x"]}, "unknown option"),
    ({"kvext_chunks": ["x"] * (MAX_MARKS + 1)}, "at most"),
    ({"kvext_chunks": ["x"] * 600, "kvext_chunk_spans": [0, 1] * 600}, "in all"),
    ({"kvext_chunk_spans": [0, MAX_POSITION + 1]}, "start < end"),
    ({"kvext_chunks": ["ok", ""]}, "non-empty"),
    ({"kvext_exact": 1}, "true or false"),
])
def test_named_refusals(params: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        FragmentOptions(params)


def test_other_custom_params_pass_through() -> None:
    options = FragmentOptions({"my_app_tag": 3, "kvext_chunks": ["a b"]})
    assert options.chunks == ["a b"] and not options.exact and options.spans == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 6), max_size=60),
       st.lists(st.lists(st.integers(0, 6), max_size=12), max_size=5))
def test_located_spans_hold_the_chunk(tokens: list[int], chunks: list[list[int]]) -> None:
    spans = locate_chunks(tokens, chunks)
    cores = [marked_core(np.asarray(c, dtype=np.int64)).tolist() for c in chunks]
    for start, end in spans:
        assert 0 <= start < end <= len(tokens)
        assert tokens[start:end] in cores
