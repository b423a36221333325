"""Which reused tokens a blend recomputes: ``choose`` and ``split`` per setting
(sgl_kvext/blend/selection.py), on hand-made deviations and attention."""

from __future__ import annotations

import pytest
import torch

from sgl_kvext.blend.selection import BlendSettings, choose, split

# Three chunks of 10 tokens; deviation rises with the index inside each chunk, so the top
# of one ranking over the prompt is the end of the last chunk.
CHUNK_OF = torch.arange(3).repeat_interleave(10)
DEVIATION = torch.arange(30, dtype=torch.float32) / 30
NO_SINKS = torch.zeros(30, dtype=torch.bool)


def _chosen(settings: BlendSettings, attention: torch.Tensor | None = None,
            count: int = 6) -> list[int]:
    return sorted(choose(settings, DEVIATION, CHUNK_OF, NO_SINKS, attention, count).tolist())


def test_plain_cacheblend_takes_the_top_deviation() -> None:
    assert _chosen(BlendSettings()) == list(range(24, 30))


def test_spread_chunk_splits_by_length() -> None:
    assert _chosen(BlendSettings(spread="chunk")) == [8, 9, 18, 19, 28, 29]


def test_spread_attention_splits_by_what_the_tail_attends() -> None:
    attention = torch.zeros(30)
    attention[3] = 0.75                       # chunk 0 gets three quarters of the budget
    attention[12] = 0.25
    got = _chosen(BlendSettings(spread="attention"), attention, count=8)
    assert got == [4, 5, 6, 7, 8, 9, 18, 19]   # top deviation inside each chunk


def test_spread_attention_without_attention_splits_by_length() -> None:
    assert _chosen(BlendSettings(spread="attention")) == [8, 9, 18, 19, 28, 29]


def test_query_share_takes_the_most_attended_first() -> None:
    attention = torch.zeros(30)
    attention[[0, 1, 2]] = torch.tensor([0.5, 0.3, 0.2])
    got = _chosen(BlendSettings(query_share=0.5), attention)
    assert got == [0, 1, 2, 27, 28, 29]


def test_sinks_count_against_the_budget() -> None:
    sinks = torch.zeros(30, dtype=torch.bool)
    sinks[[0, 10, 20]] = True
    got = choose(BlendSettings(sink_tokens=1), DEVIATION, CHUNK_OF, sinks, None, 6)
    assert sorted(got.tolist()) == [0, 10, 20, 27, 28, 29]


def test_a_nan_deviation_is_recomputed_first() -> None:
    deviation = DEVIATION.clone()
    deviation[5] = float("nan")
    got = choose(BlendSettings(), deviation, CHUNK_OF, NO_SINKS, None, 2)
    assert sorted(got.tolist()) == [5, 29]


@pytest.mark.parametrize("spread", ["chunk", "attention"])
def test_a_split_never_takes_a_token_twice(spread: str) -> None:
    attention = torch.zeros(30)
    attention[:10] = 1.0                       # the tail attends to chunk 0 only
    got = choose(BlendSettings(spread=spread, query_share=0.5), DEVIATION, CHUNK_OF,
                 NO_SINKS, attention, 20)
    assert len(set(got.tolist())) == 20


def test_split_fills_a_full_slot_and_moves_its_excess_on() -> None:
    assert split(torch.tensor([1.0, 0, 0]), torch.tensor([5.0, 10, 10]), 12).tolist() == [5, 4, 3]


def test_split_by_room_when_no_weight() -> None:
    assert split(torch.zeros(3), torch.tensor([5.0, 10, 10]), 12).tolist() == [2, 5, 5]


def test_split_never_exceeds_the_room() -> None:
    quota = split(torch.tensor([1.0, 1]), torch.tensor([2.0, 3]), 99)
    assert quota.tolist() == [2, 3]


def test_settings_refuse_an_unknown_spread() -> None:
    with pytest.raises(ValueError, match="allowed prompt, chunk, attention"):
        BlendSettings(spread="question")
