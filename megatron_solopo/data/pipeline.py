"""The build-data pipeline: source -> contexts -> sampling -> scoring -> pairs (+ summary).

Every random choice is drawn from a generator seeded by (data.seed, item id, stage), so an item's
contexts and pair do not depend on which other items are in the run, and a resumed run rebuilds the
same contexts.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pathlib
import random
import time
from collections.abc import Sequence
from typing import Any

from megatron_solopo.data.config import DataConfig
from megatron_solopo.data.contexts import (
    ContextSkip,
    ContextTemplates,
    LongContext,
    TokenCounter,
    build_long_context,
    build_short_context,
    config_prompt_examples,
)
from megatron_solopo.data.pairs import PairChoice, select_pair
from megatron_solopo.data.records import Document, QAItem, write_jsonl
from megatron_solopo.data.sampling import (ResponseBackend, SamplingRequest, SamplingSettings, SamplingStats,
                                           sample_responses)
from megatron_solopo.data.sources import load_source, read_distractor_pool
from megatron_solopo.data.summary import write_summary

__all__ = ["ItemContexts", "build_contexts", "build_data", "build_settings", "distractor_pool", "file_sha256"]

logger = logging.getLogger(__name__)
_MAX_LOGGED_SKIPS = 5


BUILD_NEUTRAL_KEYS = ("output_dir", "pairs_path", "cache_dir", "sampling_batch_size", "sampling_calls_per_batch",
                      "sampling_device", "max_seq_len_tokens", "on_too_long")
"""data.* settings that do not change which pairs are written (where they go, how fast, tokenization)."""


def build_settings(config: DataConfig, model_id: str) -> dict[str, Any]:
    """What decides the pairs a build writes: every data.* setting except BUILD_NEUTRAL_KEYS, and the
    sampling model. Recorded in summary.json (`build_settings`), so a later build can tell whether the
    files it would replace came from the same settings (commands/data.py refuses otherwise)."""
    settings = {key: value for key, value in dataclasses.asdict(config).items() if key not in BUILD_NEUTRAL_KEYS}
    return {**settings, "sampling_model_id": model_id}


def file_sha256(path: str | pathlib.Path) -> str:
    """sha256 of a file's bytes (identifies the pairs file a build wrote)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass
class ItemContexts:
    """An item with its short and long prompts."""

    item: QAItem
    short_context: str
    short_tokens: int
    long: LongContext


def _rng(config: DataConfig, item_id: str, stage: str) -> random.Random:
    return random.Random(f"{config.seed}:{item_id}:{stage}")


def distractor_pool(config: DataConfig, items: Sequence[QAItem],
                    source_pool: Sequence[Document] | None = None) -> list[Document]:
    """data.distractor_pool_path's documents, else the filler the source generated (`source_pool`: ruler),
    else every item's non-supporting documents."""
    if config.distractor_pool_path:
        return read_distractor_pool(config.distractor_pool_path)
    if source_pool is not None:
        return list(source_pool)
    return [doc for item in items for doc in item.distractor_docs]


def build_contexts(items: Sequence[QAItem], counter: TokenCounter, config: DataConfig,
                   pool: Sequence[Document]) -> tuple[list[ItemContexts], collections.Counter[str]]:
    """Short and long prompts for every item that fits; skipped items are counted by reason."""
    templates = ContextTemplates.from_config(config)
    built: list[ItemContexts] = []
    skipped: collections.Counter[str] = collections.Counter()
    for index, item in enumerate(items):
        rng = _rng(config, item.id, "contexts")
        target = rng.choice(config.long_target_tokens)
        depth = (config.evidence_depths[index % len(config.evidence_depths)]
                 if config.evidence_position == "depth" else None)
        try:
            short, short_tokens = build_short_context(item, counter, config.short_max_tokens, rng, templates)
            long = build_long_context(item, counter, target, rng, pool=pool, depth=depth,
                                      tolerance=config.long_length_tolerance, templates=templates)
        except ContextSkip as skip:
            skipped[skip.reason] += 1
            if skipped[skip.reason] <= _MAX_LOGGED_SKIPS:
                logger.warning("skipped: %s", skip)
            continue
        built.append(ItemContexts(item, short, short_tokens, long))
    return built, skipped


def _pair_record(ctx: ItemContexts, choice: PairChoice, config: DataConfig, model_id: str) -> dict[str, Any]:
    item = ctx.item
    meta = {**item.meta, "short_tokens": ctx.short_tokens, **ctx.long.meta(),
            "num_responses": choice.num_responses, "num_correct": choice.num_correct,
            "pass_rate": round(choice.pass_rate, 4), "chosen_final_answer": choice.chosen_score.final_answer,
            "rejected_final_answer": choice.rejected_score.final_answer, "pair_strategy": config.pair_strategy,
            "correct_metric": config.correct_metric, "sampled_on": config.sample_on, "sampling_model": model_id,
            "supporting_titles": [d.title for d in item.supporting_docs]}
    if item.answer_match != "any":  # every gold answer required (RULER multi-value tasks)
        meta["answer_match"] = item.answer_match
    return {"id": item.id, "question": item.question, "answers": list(item.answers),
            "short_context": ctx.short_context, "long_context": ctx.long.text, "chosen": choice.chosen,
            "rejected": choice.rejected, "meta": meta}


def build_data(config: DataConfig, tokenizer: Any, backend: ResponseBackend, model_id: str,
               progress: bool = True) -> dict[str, Any]:
    """Runs the whole pipeline and writes {output_dir}/pairs.jsonl, summary.json, summary.png, samples.jsonl.

    Args:
        config: the data section.
        tokenizer: the model's tokenizer (measures context lengths; renders sampling prompts).
        backend: response generator (see `sampling.make_backend`).
        model_id: what samples (recorded in meta and in the resume key), e.g. the model directory.

    Returns the summary dict (also in summary.json).
    """
    start = time.perf_counter()
    output_dir = pathlib.Path(config.output_dir)
    source = load_source(config)
    counter = TokenCounter(tokenizer)
    pool = distractor_pool(config, source.items, source.pool)
    contexts, context_skips = build_contexts(source.items, counter, config, pool)
    if not contexts:
        raise ValueError(f"every item was skipped while building contexts ({dict(context_skips)}); raise "
                         "data.short_max_tokens, lower data.long_target_tokens or add a distractor pool")
    t_contexts = time.perf_counter()
    settings = SamplingSettings(config.num_responses, config.sampling_temperature, config.sampling_top_p,
                                config.max_new_tokens, config.seed, config.system_prompt, config.use_chat_template,
                                model_id, config_prompt_examples(config))
    requests = [SamplingRequest(c.item.id, c.short_context if config.sample_on == "short" else c.long.text, c.item)
                for c in contexts]
    stats = SamplingStats()
    responses = sample_responses(requests, backend, settings, output_dir / "samples.jsonl", progress=progress,
                                 stats=stats, tokenizer=tokenizer)
    t_sampling = time.perf_counter()
    records, pass_rates, drops = [], [], collections.Counter()
    for ctx in contexts:
        choice = select_pair(responses[ctx.item.id], ctx.item.answers, _rng(config, ctx.item.id, "pair"),
                             config.pair_strategy, config.correct_metric, config.answer_regex,
                             config.max_answer_words, ctx.item.answer_match)
        pass_rates.append(choice.pass_rate)
        if isinstance(choice, PairChoice):
            records.append(_pair_record(ctx, choice, config, model_id))
        else:
            drops[choice.reason] += 1
    if not records:
        raise ValueError(f"no preference pair: every question was dropped ({dict(drops)}); sample more responses "
                         "(data.num_responses) or check data.answer_regex against the responses in samples.jsonl")
    write_jsonl(config.resolved_pairs_path, records)
    counts = {"items_read": len(source.items), "source_skipped": dict(source.skipped),
              "context_skipped": dict(context_skips), "sampled_questions": len(contexts),
              "responses_sampled": len(contexts) * config.num_responses, "pairs_dropped": dict(drops),
              "pairs_written": len(records)}
    timing = {"contexts_s": round(t_contexts - start, 2), "sampling_s": round(t_sampling - t_contexts, 2),
              "total_s": round(time.perf_counter() - start, 2), **stats.as_dict()}
    extra = {"pairs_path": str(config.resolved_pairs_path), "sampling_model": model_id, "timing": timing,
             "responses_per_question": config.num_responses, "temperature": config.sampling_temperature,
             "pairs_sha256": file_sha256(config.resolved_pairs_path), "build_settings": build_settings(config, model_id)}
    summary = write_summary(output_dir, counts, [c.short_tokens for c in contexts],
                            [c.long.num_tokens for c in contexts], pass_rates, extra)
    logger.info("wrote %d pairs to %s (%s)", len(records), config.resolved_pairs_path, counts)
    return summary
