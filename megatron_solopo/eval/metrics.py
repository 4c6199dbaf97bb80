"""Per-item scores (through the data room's scoring functions) and their aggregation.

Scores are 0/1 for sub-EM and EM and in [0, 1] for F1 (SQuAD normalization; `data.scoring`).
Aggregates are plain means over items, reported in percent with the item count, so a cell with 3
items is visibly less certain than one with 300.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from megatron_solopo.data.scoring import answer_scores, extract_final_answer, is_overlong

__all__ = ["METRICS", "score_prediction", "aggregate", "aggregate_by", "cell_table"]

METRICS = ("sub_em", "em", "f1")


def score_prediction(prediction: str, answers: Sequence[str], extraction: str, answer_regex: str,
                     max_answer_words: int | None = None, answer_match: str = "any") -> dict[str, Any]:
    """Scores one generated answer against `answers` under the item's `answer_match` (any: gold and
    aliases; all: every value required; `data.scoring.answer_scores`).

    extraction "final_answer": the text after the last `answer_regex` match is scored (a response
    without one, or whose final answer has more than `max_answer_words` words, scores 0 on every
    metric, as in pair building); "whole_response": the whole text (no length limit).
    Returns {"final_answer", "sub_em", "em", "f1"} with the scores as floats.
    """
    if extraction == "final_answer":
        final = extract_final_answer(prediction, answer_regex)
        if final is not None and is_overlong(final, max_answer_words):
            return {"final_answer": final, "sub_em": 0.0, "em": 0.0, "f1": 0.0}
    elif extraction == "whole_response":
        final = prediction.strip()
    else:
        raise ValueError(f"unknown answer extraction {extraction!r}; use final_answer or whole_response")
    if final is None:
        return {"final_answer": None, "sub_em": 0.0, "em": 0.0, "f1": 0.0}
    return {"final_answer": final, **answer_scores(final, answers, answer_match)}


def aggregate(records: Iterable[Mapping[str, Any]]) -> dict[str, float | int]:
    """Mean sub-EM/EM/F1 in percent (0-100) and the item count; NaN-free (0 items -> 0.0)."""
    records = list(records)
    count = len(records)
    out: dict[str, float | int] = {"num_items": count}
    for metric in METRICS:
        out[metric] = round(100.0 * sum(float(r[metric]) for r in records) / count, 4) if count else 0.0
    return out


def aggregate_by(records: Iterable[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Aggregates grouped by the values of `keys` (e.g. suite, context_length, depth), in sorted order.

    None sorts before numbers so that "not swept" rows come first.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = collections.defaultdict(list)
    for record in records:
        groups[tuple(record.get(k) for k in keys)].append(record)

    def sort_key(group: tuple) -> tuple:
        return tuple((0, "") if v is None else (1, v) if isinstance(v, (int, float)) else (2, str(v)) for v in group)

    return [{**dict(zip(keys, group)), **aggregate(groups[group])} for group in sorted(groups, key=sort_key)]


def cell_table(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (suite, context_length, depth) aggregates: the report's `cells`."""
    return aggregate_by(records, ("suite", "context_length", "depth"))
