"""Chosen/rejected selection from scored responses (the paper: sub-EM against the gold answers)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from megatron_solopo.data.scoring import DEFAULT_ANSWER_REGEX, ResponseScore, score_response

__all__ = ["PairChoice", "PairDrop", "select_pair", "STRATEGIES"]

STRATEGIES = ("random", "shortest_correct", "prefer_no_answer_rejected")


@dataclasses.dataclass(frozen=True)
class PairChoice:
    """The selected pair and the scores that led to it."""

    chosen: str
    rejected: str
    chosen_score: ResponseScore
    rejected_score: ResponseScore
    num_correct: int
    num_responses: int

    @property
    def pass_rate(self) -> float:
        return self.num_correct / self.num_responses


@dataclasses.dataclass(frozen=True)
class PairDrop:
    """No pair: `reason` is no_correct | no_incorrect | no_responses; `pass_rate` is still reported."""

    reason: str
    num_correct: int
    num_responses: int

    @property
    def pass_rate(self) -> float:
        return self.num_correct / self.num_responses if self.num_responses else 0.0


def select_pair(responses: Sequence[str], golds: Sequence[str], rng: random.Random, strategy: str = "random",
                metric: str = "sub_em", answer_regex: str = DEFAULT_ANSWER_REGEX,
                max_answer_words: int | None = None, answer_match: str = "any") -> PairChoice | PairDrop:
    """Scores `responses` and picks (chosen correct, rejected incorrect) by `strategy`.

    Empty responses are never picked; a final answer longer than `max_answer_words` words is incorrect
    (score_response); `answer_match` is the item's (any: `golds` are a gold answer and its aliases;
    all: every gold is a required value, `scoring.answer_scores`). Strategies:
      random                    -- a uniformly random correct and incorrect response;
      shortest_correct          -- the correct response with the fewest characters (first on ties),
                                   a random incorrect one;
      prefer_no_answer_rejected -- a random correct one; rejected among refusals / responses without a
                                   final answer when there are any, else a random incorrect one.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"pair strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if metric not in ("sub_em", "em"):
        raise ValueError(f"correct metric {metric!r} is not one of sub_em, em")
    candidates = [r for r in responses if r.strip()]
    scores = [score_response(r, golds, answer_regex, max_answer_words, answer_match) for r in candidates]
    correct = [i for i, s in enumerate(scores) if getattr(s, metric) == 1.0]
    incorrect = [i for i, s in enumerate(scores) if getattr(s, metric) == 0.0]
    num_responses = len(responses)
    if not candidates:
        return PairDrop("no_responses", 0, num_responses)
    if not correct:
        return PairDrop("no_correct", 0, num_responses)
    if not incorrect:
        return PairDrop("no_incorrect", len(correct), num_responses)
    if strategy == "shortest_correct":
        chosen = min(correct, key=lambda i: len(candidates[i]))
    else:
        chosen = rng.choice(correct)
    pool = incorrect
    if strategy == "prefer_no_answer_rejected":
        refusals = [i for i in incorrect if scores[i].no_answer]
        pool = refusals or incorrect
    rejected = rng.choice(pool)
    return PairChoice(candidates[chosen], candidates[rejected], scores[chosen], scores[rejected], len(correct),
                      num_responses)
