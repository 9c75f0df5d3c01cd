"""The margin-aware comparison the GPU engine tests use (tiny_models.agrees_with_greedy): a sequence may leave
generate()'s path only at a near-tie, by taking generate()'s second choice; anything else is a failure."""

from __future__ import annotations

import pytest

from tiny_models import NEAR_TIE, GreedyReference, agrees_with_greedy, assert_agree_with_greedy

REF = GreedyReference(tokens=[7, 3, 9, 4], margins=[0.9, 0.6, 0.01, 0.8], runners_up=[1, 2, 5, 6])


def test_equal_tokens_agree():
    assert agrees_with_greedy([7, 3, 9, 4], REF) is None


def test_leaving_at_a_near_tie_for_the_second_choice_agrees_whatever_follows():
    assert REF.margins[2] < NEAR_TIE
    assert agrees_with_greedy([7, 3, 5, 0], REF) is None


@pytest.mark.parametrize("got, why", [
    ([7, 2, 9, 4], "token 1: engine 2, generate() 3 (margin 0.6000"),  # a clear choice differs
    ([7, 3, 8, 4], "token 2: engine 8"),  # a near-tie, but not generate()'s second choice
    ([7, 3, 9], "lengths differ"),
])
def test_anything_else_is_reported(got, why):
    assert why in agrees_with_greedy(got, REF)


def test_at_most_max_near_ties_sequences_leave_the_path():
    assert_agree_with_greedy([[7, 3, 5, 0], [7, 3, 9, 4]], [REF, REF], max_near_ties=1)
    with pytest.raises(AssertionError, match="2 of 2 sequences left"):
        assert_agree_with_greedy([[7, 3, 5, 0], [7, 3, 5, 1]], [REF, REF], max_near_ties=1)
    with pytest.raises(AssertionError, match="prompt 1: token 0"):
        assert_agree_with_greedy([[7, 3, 9, 4], [1, 3, 9, 4]], [REF, REF])
