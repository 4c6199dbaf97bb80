"""QA sources: MuSiQue JSONL as distributed, generic JSONL/Parquet, the synthetic and RULER generators.

Every reader yields ``QAItem``s and fails on bad input with the file and line (JSONL) or row
(Parquet) of the offending record. JSONL is parsed line by line here (not through ``datasets``) so
that a malformed line is reported with its line number; Parquet goes through ``datasets``.

MuSiQue (``musique_ans_v1.0_train.jsonl`` / ``musique_full_v1.0_*.jsonl``), one object per line::

    {"id": "2hop__...", "question": "...", "answer": "...", "answer_aliases": ["..."],
     "answerable": true,            # only in musique_full; unanswerable items are skipped and counted
     "paragraphs": [{"idx": 0, "title": "...", "paragraph_text": "...", "is_supporting": false}, ...]}

Generic, one object per line (JSONL) or row (Parquet)::

    {"id": "q1",                       # optional; default "<file stem>-<line or row>"
     "question": "...", "answers": ["gold", "alias", ...],    # or "answer": "gold"
     "supporting_docs": [{"title": "...", "text": "..."} | "plain text", ...],
     "distractor_docs": [...]}        # optional

Distractor pool file (``data.distractor_pool_path``): rows with ``text`` and optional ``title``.
"""

from __future__ import annotations

import collections
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

from megatron_solopo.console import WrongFieldType
from megatron_solopo.data.config import DataConfig
from megatron_solopo.data.records import Document, QAItem, read_jsonl, require_field
from megatron_solopo.data.ruler import generate_ruler
from megatron_solopo.data.synthetic import generate_synthetic_qa

__all__ = ["read_musique", "read_generic", "read_distractor_pool", "load_source", "SourceResult"]


class SourceResult:
    """Items read from a source plus the counts of rows skipped on purpose (e.g. unanswerable).

    `pool`: filler documents the source generates for the long contexts (ruler's haystack); None: the
    pipeline's default pool (data.pipeline.distractor_pool)."""

    def __init__(self, items: list[QAItem], skipped: Mapping[str, int] | None = None,
                 pool: list[Document] | None = None) -> None:
        self.items = items
        self.skipped = collections.Counter(skipped or {})
        self.pool = pool


# ------------------------------------------------------------------------------------------ rows
def _iter_rows(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields (location, row) from JSONL/JSON-lines or Parquet; location is 'file:line' or 'file row N'."""
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        for lineno, obj in read_jsonl(path):
            yield f"{path}:{lineno}", obj
    elif suffix == ".parquet":
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        import datasets

        table = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
        for row_index, row in enumerate(table):
            yield f"{path} row {row_index}", row
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .jsonl (one JSON object per line) "
                         "or .parquet")


def _check_answers_field(value: Any, where: str, name: str) -> list[str]:
    if not isinstance(value, list):
        raise WrongFieldType(f"{where}: field {name!r} must be a list of strings, got {type(value).__name__}")
    for i, answer in enumerate(value):
        if not isinstance(answer, str):
            raise WrongFieldType(f"{where}: {name}[{i}] must be a string, got {type(answer).__name__}")
    return value


def _nonempty_answers(answers: list[str], where: str) -> list[str]:
    cleaned = [a.strip() for a in answers if a.strip()]
    if not cleaned:
        raise ValueError(f"{where}: no non-empty gold answer; every question needs at least one answer")
    # keep order, drop duplicates: the gold answer stays first
    return list(dict.fromkeys(cleaned))


# ------------------------------------------------------------------------------------------ MuSiQue
def _musique_item(obj: Mapping[str, Any], where: str) -> QAItem | None:
    item_id = require_field(obj, "id", str, where)
    question = require_field(obj, "question", str, where)
    if obj.get("answerable", True) is False:
        return None
    answer = require_field(obj, "answer", str, where)
    aliases = _check_answers_field(obj.get("answer_aliases", []), where, "answer_aliases")
    paragraphs = require_field(obj, "paragraphs", list, where)
    supporting, distractors = [], []
    for i, para in enumerate(paragraphs):
        pwhere = f"{where} paragraphs[{i}]"
        if not isinstance(para, dict):
            raise WrongFieldType(f"{pwhere}: expected an object, got {type(para).__name__}")
        doc = Document(require_field(para, "title", str, pwhere), require_field(para, "paragraph_text", str, pwhere))
        is_supporting = require_field(para, "is_supporting", bool, pwhere)
        (supporting if is_supporting else distractors).append(doc)
    if not supporting:
        raise ValueError(f"{where}: no paragraph has is_supporting=true; the item has no evidence")
    if not question.strip():
        raise ValueError(f"{where}: field 'question' is empty")
    answers = _nonempty_answers([answer, *aliases], where)
    meta = {"source": "musique", "num_hops": len(supporting)}
    return QAItem(item_id, question, answers, supporting, distractors, meta)


def read_musique(path: str | os.PathLike, max_items: int | None = None) -> SourceResult:
    """Reads MuSiQue JSONL (or Parquet with the same columns); unanswerable items are skipped and counted."""
    items: list[QAItem] = []
    skipped: collections.Counter[str] = collections.Counter()
    seen: dict[str, str] = {}
    for where, obj in _iter_rows(path):
        if max_items is not None and len(items) >= max_items:
            break
        item = _musique_item(obj, where)
        if item is None:
            skipped["unanswerable"] += 1
            continue
        _check_unique(item.id, where, seen)
        items.append(item)
    return SourceResult(items, skipped)


# ------------------------------------------------------------------------------------------ generic
def _doc_from(value: Any, where: str) -> Document:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: empty document text")
        return Document("", value)
    if isinstance(value, dict):
        text = require_field(value, "text", str, where)
        if not text.strip():
            raise ValueError(f"{where}: empty document text")
        title = value.get("title") or ""
        if not isinstance(title, str):
            raise WrongFieldType(f"{where}: field 'title' must be a string, got {type(title).__name__}")
        return Document(title, text)
    raise WrongFieldType(f"{where}: a document must be a string or an object with 'text' (and 'title'), "
                    f"got {type(value).__name__}")


def _docs_from(obj: Mapping[str, Any], name: str, where: str, required: bool) -> list[Document]:
    if name not in obj or obj[name] is None:
        if required:
            raise ValueError(f"{where}: missing field {name!r} (the evidence documents)")
        return []
    value = obj[name]
    if not isinstance(value, list):
        raise WrongFieldType(f"{where}: field {name!r} must be a list of documents, got {type(value).__name__}")
    return [_doc_from(v, f"{where} {name}[{i}]") for i, v in enumerate(value)]


def _generic_item(obj: Mapping[str, Any], where: str, default_id: str) -> QAItem:
    item_id = obj.get("id", default_id)
    if not isinstance(item_id, str) or not item_id:
        raise WrongFieldType(f"{where}: field 'id' must be a non-empty string, got {item_id!r}")
    question = require_field(obj, "question", str, where)
    if not question.strip():
        raise ValueError(f"{where}: field 'question' is empty")
    if "answers" in obj:
        answers = _check_answers_field(obj["answers"], where, "answers")
    elif "answer" in obj:
        answers = [require_field(obj, "answer", str, where)]
    else:
        raise ValueError(f"{where}: missing field 'answers' (a list of gold answers) or 'answer'")
    supporting = _docs_from(obj, "supporting_docs", where, required=True)
    if not supporting:
        raise ValueError(f"{where}: field 'supporting_docs' is empty; the item has no evidence")
    distractors = _docs_from(obj, "distractor_docs", where, required=False)
    meta = {"source": "generic", "num_hops": len(supporting)}
    return QAItem(item_id, question, _nonempty_answers(answers, where), supporting, distractors, meta)


def read_generic(path: str | os.PathLike, max_items: int | None = None) -> SourceResult:
    """Reads generic QA rows (see module docstring) from JSONL or Parquet."""
    items: list[QAItem] = []
    seen: dict[str, str] = {}
    stem = pathlib.Path(path).stem
    for index, (where, obj) in enumerate(_iter_rows(path)):
        if max_items is not None and len(items) >= max_items:
            break
        item = _generic_item(obj, where, default_id=f"{stem}-{index}")
        _check_unique(item.id, where, seen)
        items.append(item)
    return SourceResult(items)


def _check_unique(item_id: str, where: str, seen: dict[str, str]) -> None:
    if item_id in seen:
        raise ValueError(f"{where}: duplicate id {item_id!r} (first at {seen[item_id]}); ids must be unique")
    seen[item_id] = where


def read_distractor_pool(path: str | os.PathLike) -> list[Document]:
    """Reads a distractor corpus: rows with 'text' and optional 'title' (JSONL or Parquet)."""
    docs = [_doc_from(obj, where) for where, obj in _iter_rows(path)]
    if not docs:
        raise ValueError(f"{path}: the distractor pool is empty")
    return docs


# ------------------------------------------------------------------------------------------ dispatch
def load_source(config: DataConfig) -> SourceResult:
    """The QA items named by the config's source fields."""
    if config.source == "synthetic":
        count = config.max_items if config.max_items is not None else config.synthetic_num_items
        low, high = config.synthetic_num_hops
        items = generate_synthetic_qa(count, config.seed, num_hops=(low, high),
                                      entity_namespace=config.synthetic_namespace,
                                      num_distractors=config.synthetic_num_distractors,
                                      filler_sentences=tuple(config.synthetic_filler_sentences))
        return SourceResult(items)
    if config.source == "ruler":
        count = config.max_items if config.max_items is not None else config.ruler_num_items
        ruler = generate_ruler(config.ruler_spec, count, config.seed, namespace=config.ruler_namespace,
                               haystack_tokens=max(config.long_target_tokens))
        return SourceResult(ruler.items, pool=ruler.filler)
    if config.source == "musique":
        result = read_musique(config.input_path, config.max_items)
    else:
        result = read_generic(config.input_path, config.max_items)
    if not result.items:
        raise ValueError(f"{config.input_path}: no usable items (skipped: {dict(result.skipped) or 'none'})")
    return result
