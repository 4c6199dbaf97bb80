"""Record types of the data pipeline and their strict readers/writers.

Two record kinds cross file boundaries:

* ``QAItem`` -- one question with its evidence (supporting documents) and optional distractor
  documents. Every source (MuSiQue, generic JSONL/Parquet, the synthetic generator) yields these.
* pair records -- one line of ``pairs.jsonl``, the human-readable output of ``solopo build-data``
  and the input of tokenization::

      {"id": str, "question": str, "answers": [str, ...], "short_context": str,
       "long_context": str, "chosen": str, "rejected": str, "meta": {...}}

Bad input fails fast with the file and line (or row) it came from, what is wrong and how to fix it:
malformed JSON, a line that is not an object, missing fields, wrong types, empty answers, a chosen
response equal to the rejected one, duplicate ids. Files are written to a temporary name and renamed
when complete, so an interrupted run never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TextIO

from megatron_solopo.console import WrongFieldType

__all__ = [
    "Document",
    "QAItem",
    "PAIR_FIELDS",
    "read_jsonl",
    "atomic_write",
    "write_jsonl",
    "write_json",
    "validate_pair_record",
    "read_pair_records",
    "require_field",
]

PAIR_FIELDS: tuple[str, ...] = (
    "id", "question", "answers", "short_context", "long_context", "chosen", "rejected", "meta")


@dataclasses.dataclass(frozen=True)
class Document:
    """One retrievable document (a paragraph with a title)."""

    title: str
    """Document title (rendered by the document template; may be empty)."""
    text: str
    """Document body; never truncated when the document is evidence."""

    def to_dict(self) -> dict[str, str]:
        return {"title": self.title, "text": self.text}


@dataclasses.dataclass
class QAItem:
    """A multi-hop question with its evidence, independent of the source it came from."""

    id: str
    """Unique id within the source (used for resuming and for pair records)."""
    question: str
    """The question, as asked to the model."""
    answers: list[str]
    """Gold answer first, then its aliases; at least one non-empty string."""
    supporting_docs: list[Document]
    """The evidence needed to answer (MuSiQue's is_supporting paragraphs); at least one."""
    distractor_docs: list[Document] = dataclasses.field(default_factory=list)
    """The item's own irrelevant documents; used first when filling the long context."""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Source-specific extras (hop count, bridge facts...), copied into the pair record's meta."""
    answer_match: str = "any"
    """How `answers` score a response (data.scoring.answer_scores): any (gold answer and aliases, one
    must match) | all (every entry is a required value: RULER multi-value and variable tracking)."""
    spread_distractors: bool = False
    """True: the item's own distractors are spread at random among the pool's filler in the long
    context (RULER's distractor needles); False: they are the first distractors of the long context
    (data.contexts.build_long_context; the evidence is placed among the distractors either way)."""

    def __post_init__(self) -> None:
        where = f"QA item {self.id!r}"
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"{where}: id must be a non-empty string")
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"{where}: question must be a non-empty string")
        _check_answers(self.answers, where)
        if self.answer_match not in ("any", "all"):
            raise ValueError(f"{where}: answer_match={self.answer_match!r} is not one of any, all")
        if not self.supporting_docs:
            raise ValueError(f"{where}: needs at least one supporting document (the evidence)")


# ------------------------------------------------------------------------------------------ reading
def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (line number, object) for each non-blank line of a JSONL file.

    Raises ValueError naming ``file:line`` for malformed JSON or text that is not UTF-8 (with the byte
    offset in the file), and WrongFieldType (a TypeError) for a line that is not a JSON object.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a JSONL file, one JSON object per line)")
    offset = 0  # of the current line's first byte: decoding per line lets the error say where
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte offset {offset + err.start} in the file: "
                                 f"{raw[err.start:err.start + 4]!r}); re-save the file as UTF-8") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({err.msg}; column {err.colno}); "
                                 "fix or remove this line (one JSON object per line)") from None
            if not isinstance(obj, dict):
                raise WrongFieldType(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


_TYPE_NAMES = {str: "a string", list: "a list", dict: "an object", int: "an integer", bool: "true/false"}


def require_field(obj: Mapping[str, Any], name: str, kind: type, where: str) -> Any:
    """Returns obj[name], checking it exists and has the given JSON type; errors name `where`."""
    if name not in obj:
        raise ValueError(f"{where}: missing field {name!r} (present: {', '.join(sorted(obj)) or 'none'})")
    value = obj[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise WrongFieldType(f"{where}: field {name!r} must be {_TYPE_NAMES.get(kind, kind.__name__)}, "
                        f"got {type(value).__name__} {_short_repr(value)}")
    return value


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_answers(answers: Any, where: str) -> None:
    if not isinstance(answers, list):
        raise WrongFieldType(f"{where}: field 'answers' must be a list of strings, got {type(answers).__name__}")
    if not answers:
        raise ValueError(f"{where}: field 'answers' is empty; give at least one gold answer")
    for i, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise WrongFieldType(f"{where}: answers[{i}] must be a string, got {type(answer).__name__}")
        if not answer.strip():
            raise ValueError(f"{where}: answers[{i}] is an empty string; remove it or fill it in")


def validate_pair_record(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Checks one pair record (see module docstring) and returns it as a plain dict.

    `where` locates the record in errors (e.g. ``pairs.jsonl:12``).
    """
    for name in ("id", "question", "short_context", "long_context", "chosen", "rejected"):
        value = require_field(obj, name, str, where)
        if not value.strip():
            raise ValueError(f"{where}: field {name!r} is empty")
    _check_answers(require_field(obj, "answers", list, where), where)
    require_field(obj, "meta", dict, where)
    if obj["chosen"] == obj["rejected"]:
        raise ValueError(f"{where}: chosen == rejected for id {obj['id']!r}; a preference pair needs two "
                         "different responses (drop this record or pick another rejected response)")
    if len(obj["long_context"]) < len(obj["short_context"]):
        raise ValueError(f"{where}: long_context ({len(obj['long_context'])} characters) is shorter than "
                         f"short_context ({len(obj['short_context'])}) for id {obj['id']!r}; the long context holds "
                         "the short one's evidence among distractors: are the two swapped?")
    unknown = sorted(set(obj) - set(PAIR_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; put extras under 'meta'")
    return dict(obj)


def read_pair_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads and validates a pairs JSONL file; ids must be unique."""
    records: list[dict[str, Any]] = []
    first_line_of: dict[str, int] = {}
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        record = validate_pair_record(obj, where)
        if record["id"] in first_line_of:
            raise ValueError(f"{where}: duplicate id {record['id']!r} (first seen on line "
                             f"{first_line_of[record['id']]}); ids must be unique")
        first_line_of[record["id"]] = lineno
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records (the file is empty)")
    return records


# ------------------------------------------------------------------------------------------ writing
@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[TextIO]:
    """Opens a temporary sibling of `path` for writing and renames it to `path` on success.

    On an exception the temporary file is removed, so `path` is either absent, the old version, or
    complete -- never a partial file that looks finished.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    encoding = None if "b" in mode else "utf-8"
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Atomically writes records as JSONL (UTF-8, one object per line); returns the count."""
    count = 0
    with atomic_write(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically writes one JSON document (indented, for humans)."""
    with atomic_write(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
