"""Evaluation suites: the prompts `solopo eval` asks, built from the data room's generators and templates.

* multihop    -- synthetic multi-hop questions (eval entity namespace, disjoint from training); the
                 supporting documents as one block at each depth of each context length.
* niah_single -- NIAH-Plus single-document QA: one-hop questions, the one document at each depth.
* niah_multi  -- NIAH-Plus multi-document QA: multi-hop questions whose documents are scattered at
                 random slots (depth is recorded per document in the item's meta, not swept).
* short       -- the multihop questions with their evidence only: a short-context regression check.
* ruler_<task> -- RULER-style tasks of `data.ruler` (niah_single, niah_multikey, niah_multivalue,
                 variable_tracking, qa): the evidence (needle paragraphs / supporting document) as one
                 block at each depth of each length, in the task's generated filler, distractor
                 needles spread through it. ruler_<task>_short asks the same questions on x_short
                 (the evidence only), so short and long cells pair item by item.
* jsonl       -- generic QA rows (question, answers, supporting_docs, distractor_docs) from files.
                 eval.jsonl_layout=as_given (default): each row once, documents in file order
                 (supporting first), bucketed by length. eval.jsonl_layout=sweep: each row in every
                 (length, depth) cell exactly as multihop, filled with the row's own distractors, then
                 eval.jsonl_distractor_pool_path (or the other rows' documents); rows marked
                 ``"as_given": true`` stay as given.

Within a synthetic suite every question is asked in every (length, depth) cell, and for one question
and length the distractors and their order are the same at every depth: only the evidence block
moves (`data.contexts.long_context_at_depth`). Distractors come from the question's own decoys, then
from further synthetic items generated in the same call (so their fictional entities never collide
with a question's entities). Lengths are measured on the user prompt (documents + question +
instruction) with the model's tokenizer, before the chat template adds its few tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import pathlib
import random
from collections.abc import Iterable, Sequence
from typing import Any

from megatron_solopo.console import WrongFieldType
from megatron_solopo.data.contexts import (
    ContextSkip,
    ContextTemplates,
    TokenCounter,
    build_long_context,
    build_short_context,
    long_context_at_depth,
    render_prompt,
)
from megatron_solopo.data.records import Document, QAItem
from megatron_solopo.data.ruler import generate_ruler
from megatron_solopo.data.sources import _iter_rows, read_distractor_pool, read_generic
from megatron_solopo.data.synthetic import generate_synthetic_qa
from megatron_solopo.eval.config import DEPTH_SUITES, RULER_SHORT_SUITES, EvalConfig, ruler_task_of

__all__ = ["EvalItem", "SuiteBuild", "build_suites", "suite_seed", "length_bucket"]

# a pool holding this much more text than the longest target never runs dry
_POOL_HEADROOM = 1.3
_PROBE_ITEMS = 8


@dataclasses.dataclass
class EvalItem:
    """One question in one context configuration (one row of the report's `items`)."""

    suite: str
    """Suite name (multihop | niah_single | niah_multi | short | jsonl)."""
    item_id: str
    """Unique within a report: suite/source id/length/depth."""
    source_id: str
    """Id of the QA item (the same question appears in several cells)."""
    question: str
    answers: list[str]
    """Gold answer first, then aliases."""
    prompt: str
    """The user prompt (documents and question) before the chat template."""
    context_length: int | None
    """Target length in tokens (long suites, jsonl sweep), the length bucket (jsonl as given), None for short."""
    depth: float | None
    """Evidence depth in [0, 1] (multihop, niah_single, jsonl sweep); None where not swept."""
    prompt_tokens: int
    """Measured tokens of `prompt` (no chat template)."""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Evidence depths/positions, hop count, source."""
    answer_match: str = "any"
    """How `answers` score (data.scoring.answer_scores): any (gold or an alias) | all (every value)."""


@dataclasses.dataclass
class SuiteBuild:
    """The items of all configured suites plus what was skipped and why."""

    items: list[EvalItem]
    skipped: dict[str, dict[str, int]]
    """suite -> reason -> count (e.g. not_enough_distractors, evidence_over_long_target)."""


def suite_seed(seed: int, name: str) -> int:
    """A per-suite seed derived from eval.seed (stable across Python runs, unlike hash())."""
    return int.from_bytes(hashlib.sha256(f"solopo-eval-{seed}-{name}".encode()).digest()[:4], "big")


def length_bucket(num_tokens: int, lengths: Sequence[int]) -> int:
    """The smallest configured length >= num_tokens (the last one for longer prompts)."""
    for length in lengths:
        if num_tokens <= length:
            return length
    return lengths[-1]


def _item_docs(item: QAItem) -> list[Document]:
    return list(item.supporting_docs) + list(item.distractor_docs)


def _synthetic_items(config: EvalConfig, name: str, hops: tuple[int, int], counter: TokenCounter,
                     templates: ContextTemplates, need_pool: bool) -> tuple[list[QAItem], list[Document]]:
    """`num_samples` questions plus a distractor pool large enough for the longest context length."""
    seed = suite_seed(config.seed, name)

    def generate(count: int) -> list[QAItem]:
        return generate_synthetic_qa(count, seed, num_hops=hops, entity_namespace="eval")

    questions = config.num_samples
    if not need_pool:
        return generate(questions), []
    probe = generate(questions + _PROBE_ITEMS)
    tokens_per_item = sum(counter(templates.document.format(index=1, title=d.title, text=d.text))
                          for item in probe[questions:] for d in _item_docs(item)) / _PROBE_ITEMS
    pool_items = math.ceil(_POOL_HEADROOM * max(config.context_lengths) / max(tokens_per_item, 1.0)) + 1
    items = generate(questions + pool_items)  # the generator is prefix-stable: questions are unchanged
    pool = [d for item in items[questions:] for d in _item_docs(item)]
    return items[:questions], pool


def _long_items(name: str, questions: Sequence[QAItem], pool: Sequence[Document], config: EvalConfig,
                counter: TokenCounter, templates: ContextTemplates, skipped: collections.Counter,
                progress: Any) -> Iterable[EvalItem]:
    depths: Sequence[float | None] = config.depths if name in DEPTH_SUITES else [None]
    for item in questions:
        for length in config.context_lengths:
            layout_seed = suite_seed(config.seed, f"{name}/{item.id}/{length}")
            for depth in depths:
                if progress is not None:
                    progress.update(1)
                try:
                    if depth is None:
                        context = build_long_context(item, counter, length, random.Random(layout_seed), pool=pool,
                                                     depth=None, tolerance=config.length_tolerance,
                                                     templates=templates)
                    else:
                        context = long_context_at_depth(item, counter, length, depth, seed=layout_seed, pool=pool,
                                                        tolerance=config.length_tolerance, templates=templates)
                except ContextSkip as skip:
                    skipped[skip.reason] += 1
                    continue
                depth_tag = "random" if depth is None else f"{depth:g}"
                yield EvalItem(name, f"{name}/{item.id}/L{length}/d{depth_tag}", item.id, item.question,
                               list(item.answers), context.text, length, depth, context.num_tokens,
                               {"num_hops": item.meta.get("num_hops"), **_match_meta(item), **context.meta()},
                               item.answer_match)


def _match_meta(item: QAItem) -> dict[str, str]:
    return {"answer_match": item.answer_match} if item.answer_match != "any" else {}


def _short_items(questions: Sequence[QAItem], config: EvalConfig, counter: TokenCounter,
                 templates: ContextTemplates, name: str = "short") -> Iterable[EvalItem]:
    for item in questions:
        rng = random.Random(suite_seed(config.seed, f"short/{item.id}"))
        text, num_tokens = build_short_context(item, counter, max_tokens=1 << 62, rng=rng, templates=templates)
        yield EvalItem(name, f"{name}/{item.id}", item.id, item.question, list(item.answers), text, None, None,
                       num_tokens, {"num_hops": item.meta.get("num_hops"), **_match_meta(item)}, item.answer_match)


def _ruler_questions(config: EvalConfig, task: str) -> tuple[list[QAItem], list[Document]]:
    """The questions of ruler_<task> (and ruler_<task>_short: the same ones) and their filler."""
    source = generate_ruler(config.ruler_spec(task), config.num_samples, suite_seed(config.seed, f"ruler_{task}"),
                            namespace="eval", haystack_tokens=max(config.context_lengths))
    return source.items, source.filler


def _jsonl_rows(config: EvalConfig) -> list[tuple[str, QAItem, bool]]:
    """(file, item, as_given) for every row of every jsonl file, in file order.

    `as_given` is the row's own ``"as_given": true`` flag (a row that carries its whole context).
    """
    rows = []
    for path in config.jsonl_paths:
        items = read_generic(path, max_items=config.jsonl_max_items).items
        if not items:
            raise ValueError(f"eval.jsonl_paths: {path} holds no QA rows (empty file?); give it rows of "
                             "question, answers and documents (examples/eval/my_qa.jsonl) or remove it")
        flags = []
        for where, obj in _iter_rows(path):
            if len(flags) == len(items):
                break
            flag = obj.get("as_given", False)
            if not isinstance(flag, bool):
                raise WrongFieldType(f"{where}: field 'as_given' must be true or false, got {flag!r}")
            flags.append(flag)
        rows.extend((str(path), item, flag) for item, flag in zip(items, flags, strict=True))
    return rows


def _as_given_item(path: str, item: QAItem, config: EvalConfig, counter: TokenCounter,
                   templates: ContextTemplates) -> EvalItem:
    text = render_prompt(item.question, _item_docs(item), templates)
    num_tokens = counter(text)
    return EvalItem("jsonl", f"jsonl/{path}/{item.id}", item.id, item.question, list(item.answers), text,
                    length_bucket(num_tokens, config.context_lengths), None, num_tokens,
                    {"file": path, "layout": "as_given", **{k: v for k, v in item.meta.items() if k != "source"}})


def _jsonl_pool(config: EvalConfig, rows: Sequence[tuple[str, QAItem, bool]]) -> list[Document]:
    """The filler documents of the sweep: the pool file, or every row's documents (deduplicated)."""
    if config.jsonl_distractor_pool_path is not None:
        return read_distractor_pool(config.jsonl_distractor_pool_path)
    seen: set[str] = set()
    pool = []
    for _, item, _ in rows:
        for doc in _item_docs(item):
            if doc.text not in seen:
                seen.add(doc.text)
                pool.append(doc)
    return pool


def _jsonl_items(config: EvalConfig, counter: TokenCounter, templates: ContextTemplates,
                 skipped: collections.Counter, progress_factory: Any = None) -> Iterable[EvalItem]:
    rows = _jsonl_rows(config)
    if config.jsonl_layout == "as_given":
        yield from (_as_given_item(path, item, config, counter, templates) for path, item, _ in rows)
        return
    pool = _jsonl_pool(config, rows)
    swept = sum(not flag for _, _, flag in rows)
    cells = len(config.context_lengths) * len(config.depths)
    bar = progress_factory(swept * cells, "building jsonl contexts") if progress_factory and swept else None
    for path, item, as_given in rows:
        if as_given:
            yield _as_given_item(path, item, config, counter, templates)
            continue
        for length in config.context_lengths:
            # seeded by the file's name, not its path: the same file gives the same prompts wherever it lives
            layout_seed = suite_seed(config.seed, f"jsonl/{pathlib.Path(path).name}/{item.id}/{length}")
            for depth in config.depths:
                if bar is not None:
                    bar.update(1)
                try:
                    context = long_context_at_depth(item, counter, length, depth, seed=layout_seed, pool=pool,
                                                    tolerance=config.length_tolerance, templates=templates)
                except ContextSkip as skip:
                    skipped[skip.reason] += 1
                    continue
                yield EvalItem("jsonl", f"jsonl/{path}/{item.id}/L{length}/d{depth:g}", item.id, item.question,
                               list(item.answers), context.text, length, depth, context.num_tokens,
                               {"file": path, "layout": "sweep",
                                **{k: v for k, v in item.meta.items() if k != "source"}, **context.meta()})
    if bar is not None:
        bar.close()


def build_suites(config: EvalConfig, tokenizer: Any, templates: ContextTemplates | None = None,
                 progress_factory: Any = None) -> SuiteBuild:
    """All EvalItems of `config.suites`, in suite order; contexts skipped for a reason are counted.

    `tokenizer` measures lengths (a HF tokenizer or a TokenCounter); `templates` render documents
    and prompts (from the data config, so eval matches training; None: the data defaults). `progress_factory(total, desc)`
    returns a tqdm-like bar (None: no progress output).
    """
    counter = tokenizer if isinstance(tokenizer, TokenCounter) else TokenCounter(tokenizer)
    templates = templates or ContextTemplates()
    items: list[EvalItem] = []
    skipped: dict[str, dict[str, int]] = {}
    hops = (config.num_hops[0], config.num_hops[1])
    for name in config.suites:
        reasons: collections.Counter = collections.Counter()
        task = ruler_task_of(name)
        if name == "jsonl":
            items.extend(_jsonl_items(config, counter, templates, reasons, progress_factory))
        elif name in RULER_SHORT_SUITES:
            questions, _ = _ruler_questions(config, task)
            items.extend(_short_items(questions, config, counter, templates, name))
        elif task is not None:
            questions, pool = _ruler_questions(config, task)
            cells = len(config.context_lengths) * len(config.depths)
            bar = progress_factory(len(questions) * cells, f"building {name} contexts") if progress_factory else None
            items.extend(_long_items(name, questions, pool, config, counter, templates, reasons, bar))
            if bar is not None:
                bar.close()
        elif name == "short":
            # the multihop suite's questions, so short vs long accuracy compares the same questions
            questions, _ = _synthetic_items(config, "multihop", hops, counter, templates, need_pool=False)
            items.extend(_short_items(questions, config, counter, templates))
        else:
            suite_hops = (1, 1) if name == "niah_single" else hops
            questions, pool = _synthetic_items(config, name, suite_hops, counter, templates, need_pool=True)
            cells = len(config.context_lengths) * (len(config.depths) if name in DEPTH_SUITES else 1)
            bar = progress_factory(len(questions) * cells, f"building {name} contexts") if progress_factory else None
            items.extend(_long_items(name, questions, pool, config, counter, templates, reasons, bar))
            if bar is not None:
                bar.close()
        skipped[name] = dict(reasons)
    return SuiteBuild(items, skipped)
