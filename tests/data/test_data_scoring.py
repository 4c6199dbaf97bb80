"""Answer scoring and pair selection on hand-made cases (expected values derived by hand)."""

import random

import pytest

from megatron_solopo.data.pairs import PairChoice, PairDrop, select_pair
from megatron_solopo.data.scoring import (exact_match, extract_final_answer, is_no_answer, normalize_answer,
                                          score_response, sub_exact_match, token_f1)


def test_normalize_answer_squad_rules():
    assert normalize_answer("The  Houston-Baptist University!") == "houston baptist university"
    assert normalize_answer("An apple, a pear and THE plum.") == "apple pear and plum"
    assert normalize_answer("“Quoted” — dash") == "quoted dash"


@pytest.mark.parametrize("response, expected", [
    ("The paper belongs to HBU. HBU was founded in 1960.\nAnswer: 1960.", "1960"),
    ("Answer: Paris\nWait, let me recheck.\nAnswer: Lyon", "Lyon"),
    ("**Answer:** Houston Baptist University", "Houston Baptist University"),
    ("So the final answer is: 42", "42"),
    ('Finishing with "Answer: 50,500"', "50,500"),
    ("Answer: “Port Kessa”.", "Port Kessa"),
    ("I think it is 1960 but I am not sure.", None),
])
def test_extract_final_answer(response, expected):
    assert extract_final_answer(response) == expected


def test_exact_match():
    assert exact_match("the Eiffel Tower", ["Eiffel Tower"]) == 1.0
    assert exact_match("Eiffel Tower, Paris", ["Eiffel Tower"]) == 0.0
    assert exact_match("E. Tower", ["Eiffel Tower", "E. Tower"]) == 1.0  # any alias


def test_sub_exact_match_word_boundaries_and_aliases():
    assert sub_exact_match("It was founded in 1960", ["1960"]) == 1.0
    assert sub_exact_match("19601", ["1960"]) == 0.0  # not inside a longer token
    assert sub_exact_match("Houston Baptist University", ["Houston Baptist"]) == 1.0
    assert sub_exact_match("the HBU", ["Houston Baptist University", "HBU"]) == 1.0
    assert sub_exact_match("Houston", ["Houston Baptist University"]) == 0.0  # gold must be inside prediction
    assert sub_exact_match("anything", ["the"]) == 0.0  # a gold that normalizes to nothing never matches


def test_token_f1_hand_computed():
    # pred {houston, baptist, university}, gold {baptist, university, of, houston}: overlap 3, P=1, R=3/4
    assert token_f1("Houston Baptist University", ["Baptist University of Houston"]) == pytest.approx(6 / 7)
    # overlap 1: P=1/2, R=1/3 -> 2*(1/6)/(5/6) = 0.4
    assert token_f1("red blue", ["blue green yellow"]) == pytest.approx(0.4)
    assert token_f1("red", ["blue"]) == 0.0
    assert token_f1("blue", ["red", "the blue"]) == 1.0  # best over golds, articles dropped


def test_no_answer_detection():
    assert is_no_answer(None)
    assert is_no_answer("Not mentioned in the documents")
    assert is_no_answer("unknown")
    assert not is_no_answer("Houston")


def test_score_response_without_final_answer_is_incorrect():
    score = score_response("The answer appears to be 1960 somewhere", ["1960"])
    assert (score.final_answer, score.sub_em, score.em, score.f1, score.no_answer) == (None, 0.0, 0.0, 0.0, True)
    # the gold inside the reasoning does not count, only the final answer does
    score = score_response("HBU was founded in 1960.\nAnswer: 1961", ["1960"])
    assert score.sub_em == 0.0


RESPONSES = [
    "Long reasoning about the newspaper and the college.\nAnswer: 1960",   # correct, long
    "Short.\nAnswer: 1960",                                                # correct, shortest
    "It says 1950.\nAnswer: 1950",                                         # wrong value
    "The documents do not say.\nAnswer: not mentioned",                    # refusal
    "",                                                                    # empty: never picked
]


def test_select_pair_strategies():
    golds = ["1960"]
    for seed in range(20):
        choice = select_pair(RESPONSES, golds, random.Random(seed), "random")
        assert isinstance(choice, PairChoice)
        assert choice.chosen in RESPONSES[:2] and choice.rejected in RESPONSES[2:4]
        assert (choice.num_correct, choice.num_responses) == (2, 5)
        assert choice.pass_rate == pytest.approx(0.4)
        assert select_pair(RESPONSES, golds, random.Random(seed), "shortest_correct").chosen == RESPONSES[1]
        assert select_pair(RESPONSES, golds, random.Random(seed), "prefer_no_answer_rejected").rejected == RESPONSES[3]
    rejected_seen = {select_pair(RESPONSES, golds, random.Random(s), "random").rejected for s in range(20)}
    assert rejected_seen == set(RESPONSES[2:4])


def test_select_pair_drops():
    assert select_pair(RESPONSES[2:4], ["1960"], random.Random(0)) == PairDrop("no_correct", 0, 2)
    assert select_pair(RESPONSES[:2], ["1960"], random.Random(0)) == PairDrop("no_incorrect", 2, 2)
    assert select_pair(["", " "], ["1960"], random.Random(0)).reason == "no_responses"
    # em is stricter than sub_em: "in 1960" is sub-EM correct but not EM correct
    responses = ["Answer: in 1960", "Answer: 1950"]
    assert isinstance(select_pair(responses, ["1960"], random.Random(0), metric="sub_em"), PairChoice)
    assert select_pair(responses, ["1960"], random.Random(0), metric="em").reason == "no_correct"
