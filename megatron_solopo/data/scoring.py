"""Answer scoring: final-answer extraction, SQuAD-style normalization, sub-EM, EM and token F1.

The paper picks chosen/rejected responses by sub-EM against the gold answers (a gold answer or alias
contained in the prediction). Responses are chain-of-thought; the prediction scored is the final
answer extracted from the last ``Answer: ...`` line, so a correct entity mentioned only in the
reasoning (e.g. a rejected bridge entity) does not count as correct.

How the gold answers are matched is the item's ``answer_match`` (``QAItem.answer_match``):

* ``any`` (default; MuSiQue, synthetic, RULER single-answer tasks): ``answers`` are one gold answer and
  its aliases; a prediction matching any of them is right (the paper's sub-EM).
* ``all`` (RULER multi-value and variable tracking): every entry of ``answers`` is a required value.
  The final answer is read as a list: its parts are the non-empty pieces between commas,
  semicolons, slashes, newlines and the word "and". sub-EM is 1 only when every value occurs in the
  final answer (on word boundaries, as for sub-EM): all or nothing, so a partial list is wrong and
  never a chosen response. F1 is over the list: precision = parts that contain a value / parts,
  recall = values found / values (2 of 4 values and nothing else: P = 1, R = 1/2, F1 = 2/3; all 4
  plus a wrong one: P = 4/5, R = 1, F1 = 8/9). EM is 1 when P = R = 1 and there are exactly as many
  parts as values (nothing listed twice or fused). "VAR QWERT" is a part holding the value QWERT.

`answer_scores` is the one function that applies the rule; pair selection and `solopo eval` call it.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string
from collections.abc import Sequence

__all__ = [
    "DEFAULT_ANSWER_REGEX",
    "DEFAULT_MAX_ANSWER_WORDS",
    "normalize_answer",
    "extract_final_answer",
    "exact_match",
    "sub_exact_match",
    "token_f1",
    "ANSWER_MATCHES",
    "answer_scores",
    "ResponseScore",
    "score_response",
    "is_no_answer",
    "is_overlong",
]

DEFAULT_ANSWER_REGEX = r"answer\s*(?:is)?\s*[:：]\s*(.+)"
"""Matches ``Answer: X`` (case-insensitive); the last match in a response is its final answer."""
DEFAULT_MAX_ANSWER_WORDS = 12
"""Final answers longer than this are copied passages, not answers (gold answers are entities/short phrases)."""

ANSWER_MATCHES = ("any", "all")
"""How gold answers are matched: any (gold + aliases: one must match) | all (every value required)."""

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"‘", "’", "“", "”", "–", "—"}
# phrases that mean "the model declined to answer"; matched on the normalized final answer
_NO_ANSWER_PATTERNS = re.compile(
    r"\b(no answer|unknown|not (?:mentioned|stated|given|provided|specified|known|available)|"
    r"cannot be determined|can not be determined|can t be determined|unanswerable|"
    r"i do not know|i don t know|insufficient information|not enough information|none)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, drop punctuation and articles (a/an/the), squeeze spaces."""
    text = text.lower()
    text = "".join(" " if ch in _PUNCT else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def extract_final_answer(response: str, answer_regex: str = DEFAULT_ANSWER_REGEX) -> str | None:
    """The text captured by the last match of `answer_regex` (group 1), stripped; None if no match.

    Markdown emphasis (``**Answer:** X``), surrounding quotes and a trailing period are removed.
    """
    matches = list(re.finditer(answer_regex, response, flags=re.IGNORECASE))
    if not matches:
        return None
    return matches[-1].group(1).strip().strip("*_`\"'“”‘’ ").rstrip(".").strip("\"'“”‘’ ")


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals a normalized gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(gold) for gold in golds))


def sub_exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if a normalized gold answer occurs in the normalized prediction on word boundaries.

    Word boundaries keep ``1960`` from matching inside ``19601``; an empty normalized gold never
    matches (otherwise every prediction would).
    """
    pred = f" {normalize_answer(prediction)} "
    for gold in golds:
        norm = normalize_answer(gold)
        if norm and f" {norm} " in pred:
            return 1.0
    return 0.0


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """SQuAD token F1 between normalized prediction and each gold; the best over golds."""
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        gold_tokens = normalize_answer(gold).split()
        common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
        overlap = sum(common.values())
        if overlap == 0:
            continue
        precision = overlap / len(pred_tokens)
        recall = overlap / len(gold_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


_PART_SEPARATORS = re.compile(r"[,;/\n]|\band\b", flags=re.IGNORECASE)


def answer_scores(final_answer: str, golds: Sequence[str], answer_match: str = "any") -> dict[str, float]:
    """{"sub_em", "em", "f1"} of an extracted final answer under `answer_match` (module docstring)."""
    if answer_match == "any":
        return {"sub_em": sub_exact_match(final_answer, golds), "em": exact_match(final_answer, golds),
                "f1": token_f1(final_answer, golds)}
    if answer_match != "all":
        raise ValueError(f"answer_match={answer_match!r} is not one of {', '.join(ANSWER_MATCHES)}")
    parts = [p for p in _PART_SEPARATORS.split(final_answer) if normalize_answer(p)]
    found = sum(sub_exact_match(final_answer, [gold]) for gold in golds)
    matched = sum(sub_exact_match(part, golds) for part in parts)
    if not found or not matched:
        return {"sub_em": 0.0, "em": 0.0, "f1": 0.0}
    precision, recall = matched / len(parts), found / len(golds)
    exact = precision == recall == 1.0 and len(parts) == len(golds)
    return {"sub_em": float(recall == 1.0), "em": float(exact), "f1": 2 * precision * recall / (precision + recall)}


def is_no_answer(final_answer: str | None) -> bool:
    """True for a missing final answer or a refusal such as "not mentioned" / "unknown"."""
    if final_answer is None:
        return True
    norm = normalize_answer(final_answer)
    return not norm or bool(_NO_ANSWER_PATTERNS.search(norm))


@dataclasses.dataclass(frozen=True)
class ResponseScore:
    """Scores of one sampled response against the gold answers."""

    final_answer: str | None
    """Extracted final answer (None when the response has no ``Answer:`` line)."""
    sub_em: float
    em: float
    f1: float
    no_answer: bool
    """The response declined to answer or gave no parseable final answer."""
    overlong: bool = False
    """The final answer has more than max_answer_words words: scored 0 (a copied passage, not an answer)."""


def is_overlong(final_answer: str, max_answer_words: int | None) -> bool:
    """True when `final_answer` has more whitespace-separated words than `max_answer_words` (None: never)."""
    return max_answer_words is not None and len(final_answer.split()) > max_answer_words


def score_response(response: str, golds: Sequence[str], answer_regex: str = DEFAULT_ANSWER_REGEX,
                   max_answer_words: int | None = None, answer_match: str = "any") -> ResponseScore:
    """Extracts the final answer and scores it against `golds` under `answer_match` (`answer_scores`); a
    response with no final answer, or with a final answer longer than `max_answer_words` words (None:
    no limit), scores 0."""
    final = extract_final_answer(response, answer_regex)
    if final is None:
        return ResponseScore(None, 0.0, 0.0, 0.0, True)
    if is_overlong(final, max_answer_words):
        return ResponseScore(final, 0.0, 0.0, 0.0, False, overlong=True)
    scores = answer_scores(final, golds, answer_match)
    return ResponseScore(final, scores["sub_em"], scores["em"], scores["f1"], is_no_answer(final))
