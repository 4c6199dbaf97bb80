"""The `eval` section of an experiment config: which suites, lengths, depths, and how to generate.

Prompts are rendered with the experiment's `data` section (document template, prompt template, system
prompt, chat template, answer regex) so that evaluation asks questions in the format the model was
trained on. See docs/evaluation.md for the suites and the report schema.
"""

from __future__ import annotations

import dataclasses
import re

from megatron_solopo.data.ruler import RULER_DEFAULTS, RULER_TASKS, RulerSpec

__all__ = ["EvalConfig", "SUITES", "SYNTHETIC_SUITES", "LONG_SUITES", "DEPTH_SUITES", "BACKENDS",
           "MEGATRON_DECODE", "ANSWER_EXTRACTION", "DTYPES", "JSONL_LAYOUTS", "RULER_SUITES", "RULER_SHORT_SUITES",
           "ruler_task_of"]

_RULER_WHAT = {
    "niah_single": "one needle (a magic number for a key) hidden in a paragraph; return its number",
    "niah_multikey": "the needle plus eval.ruler_num_distractors needles with other keys in the haystack",
    "niah_multivalue": "eval.ruler_num_values needles for one key; every number required",
    "variable_tracking": "a chain VAR A = 12345, VAR B = VAR A, ... (eval.ruler_num_hops copies) and other chains; "
                         "every variable with the value required",
    "qa": "a one-hop fact question, its document among decoys (eval.ruler_num_distractors) and filler",
}
RULER_SUITES = tuple(f"ruler_{task}" for task in RULER_TASKS)
"""RULER-style suites (data.ruler), each at every length and depth."""
RULER_SHORT_SUITES = tuple(f"{suite}_short" for suite in RULER_SUITES)
"""The same questions on their short context (the evidence only): x_short of the paired comparison."""

SUITES = {
    "multihop": "synthetic multi-hop QA; the supporting documents as one block at each depth, at each length",
    "niah_single": "NIAH-Plus single-document QA: a one-hop question, its one document at each depth and length",
    "niah_multi": "NIAH-Plus multi-document QA: multi-hop, the supporting documents scattered at random slots",
    "short": "short-context regression check: the multihop questions with their evidence only (no distractors)",
    "jsonl": "QA rows from JSONL/Parquet files (generic format; e.g. LongBench / RULER QA exports): as given, or "
             "their supporting documents swept over depths and filled to lengths (eval.jsonl_layout=sweep)",
    **{f"ruler_{task}": f"RULER-style {task}: {what}; at each depth and length" for task, what in _RULER_WHAT.items()},
    **{f"ruler_{task}_short": f"the ruler_{task} questions on their short context (evidence only, no filler)"
       for task in RULER_TASKS},
}
SYNTHETIC_SUITES = ("multihop", "niah_single", "niah_multi", "short", *RULER_SUITES, *RULER_SHORT_SUITES)
LONG_SUITES = ("multihop", "niah_single", "niah_multi", *RULER_SUITES)
"""Suites evaluated at every configured context length."""
DEPTH_SUITES = ("multihop", "niah_single", *RULER_SUITES)
"""Suites evaluated at every configured evidence depth (niah_multi places documents at random)."""
BACKENDS = ("hf", "megatron")
MEGATRON_DECODE = ("auto", "engine", "static_kv", "recompute")
ANSWER_EXTRACTION = ("final_answer", "whole_response")
DTYPES = ("auto", "fp32", "bf16", "fp16")
JSONL_LAYOUTS = ("as_given", "sweep")


@dataclasses.dataclass
class EvalConfig:
    """What `solopo eval` measures and how it generates (greedy decoding, batched)."""

    suites: list[str] = dataclasses.field(default_factory=lambda: ["multihop", "short"])
    """Suites to run: multihop | niah_single | niah_multi | short | jsonl | ruler_<task> and
    ruler_<task>_short for the tasks niah_single, niah_multikey, niah_multivalue, variable_tracking and
    qa (docs/evaluation.md)."""
    context_lengths: list[int] = dataclasses.field(default_factory=lambda: [1024, 4096, 8192, 16384])
    """Target prompt lengths in tokens of the model's tokenizer for the long suites (each item is
    evaluated at each length). For the jsonl suite they are the buckets of the per-length table."""
    depths: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Evidence depths in [0, 1] for multihop, niah_single and the ruler_* suites: the fraction of
    distractor tokens placed before the evidence block (0 = evidence first, 1 = evidence last, before
    the question)."""
    num_samples: int = 10
    """Questions per synthetic suite; each is evaluated in every (length, depth) cell, so a suite
    costs num_samples x len(context_lengths) x len(depths) generations (short: num_samples)."""
    num_hops: list[int] = dataclasses.field(default_factory=lambda: [2, 3])
    """Inclusive [min, max] bridge facts per question for multihop, niah_multi and short
    (niah_single always asks one-hop questions). niah_multi needs min >= 2."""
    ruler_num_distractors: int | None = None
    """ruler_niah_multikey: needles with other keys (null: 3); ruler_variable_tracking: other chains
    (null: 1); ruler_qa: decoy documents (null: 4). Must stay null unless one of them is in suites."""
    ruler_num_values: int | None = None
    """ruler_niah_multivalue: numbers for the one key, all required (null: 4)."""
    ruler_num_hops: int | None = None
    """ruler_variable_tracking: copies in the chain (num_hops + 1 variables, all required; null: 4)."""
    length_tolerance: float = 0.05
    """Accepted relative distance between a long prompt's length and its target length."""
    jsonl_paths: list[str] = dataclasses.field(default_factory=list)
    """Files for the jsonl suite (generic QA rows: question, answers, supporting_docs and optional
    distractor_docs; laid out as eval.jsonl_layout says). Required iff "jsonl" is in suites."""
    jsonl_max_items: int | None = None
    """Use only the first N rows of each jsonl file (null: all)."""
    jsonl_layout: str = "as_given"
    """as_given: each row once, its documents in file order (supporting first), bucketed by length |
    sweep: each row at every context length and depth, exactly as the multihop suite: its supporting
    documents as one block at each depth, filled to each length with the row's own distractor_docs,
    then the distractor pool. Rows with "as_given": true (e.g. a LongBench row whose one document is
    its whole context) stay as given in both layouts."""
    jsonl_distractor_pool_path: str | None = None
    """jsonl_layout=sweep: a JSONL/Parquet of filler documents (rows with "text" and optional "title").
    null: the documents of the other rows of eval.jsonl_paths (they must not answer each other's
    questions)."""
    max_new_tokens: int = 128
    """Longest generated answer in tokens (greedy decoding stops earlier at EOS)."""
    batch_size: int = 4
    """Prompts per generation batch, longest first. With backend=hf each prompt is prefilled alone and
    the batch's answers are decoded together, so this only sets the decoding batch (larger is faster
    on CPU, costing one KV cache per prompt); the megatron loop and hf-generate pad to the batch."""
    backend: str = "hf"
    """hf: transformers generate with KV cache on a HF checkpoint (a Megatron checkpoint is first
    exported to HF in a temporary directory) | megatron: the Megatron-Core GPTModel itself."""
    megatron_decode: str = "auto"
    """backend=megatron: engine (Megatron-Core's static inference engine; CUDA only) | static_kv
    (our loop with Megatron's StaticInferenceContext KV cache) | recompute (our loop, whole prefix
    recomputed per token; works with any attention) | auto (engine on CUDA, else static_kv when a
    probe shows cached logits equal recomputed ones, else recompute). Must stay auto for hf."""
    device: str = "auto"
    """auto (cuda if available) | cpu | cuda | cuda:N."""
    dtype: str = "auto"
    """Weights/compute dtype: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16."""
    answer_extraction: str = "final_answer"
    """What is scored: final_answer (the last match of data.answer_regex, as in pair building; a
    response without one scores 0) | whole_response (the full generated text; for direct-answer
    prompts such as LongBench's)."""
    seed: int = 0
    """Seed of the synthetic eval items (entity namespace "eval", disjoint from training) and of
    distractor order. Same config + seed -> same prompts."""
    output_dir: str = "outputs/eval"
    """Where report.json, report.md, accuracy_vs_length.png and depth_heatmap.png are written (a
    directory holding another model's report gets the new one in a subdirectory named by its label)."""
    label: str | None = None
    """Name of the evaluated model in reports and comparison tables (null: the directory name)."""

    def __post_init__(self) -> None:
        self._check_choices()
        self._check_suites()
        self._check_ruler()
        self._check_numbers()

    def _check_choices(self) -> None:
        for name, allowed in (("backend", BACKENDS), ("megatron_decode", MEGATRON_DECODE),
                              ("answer_extraction", ANSWER_EXTRACTION), ("dtype", DTYPES),
                              ("jsonl_layout", JSONL_LAYOUTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"eval.{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"eval.device={self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.backend == "hf" and self.megatron_decode != "auto":
            raise ValueError(f"eval.megatron_decode={self.megatron_decode!r} only applies to eval.backend=megatron; "
                             "remove it or set eval.backend=megatron")

    def _check_suites(self) -> None:
        if not self.suites:
            raise ValueError(f"eval.suites is empty; choose from {', '.join(SUITES)}")
        unknown = [s for s in self.suites if s not in SUITES]
        if unknown:
            raise ValueError(f"eval.suites has unknown suite(s) {unknown}; choose from {', '.join(SUITES)}")
        if len(set(self.suites)) != len(self.suites):
            raise ValueError(f"eval.suites lists a suite twice: {self.suites}")
        if ("jsonl" in self.suites) != bool(self.jsonl_paths):
            raise ValueError("eval.jsonl_paths must be given exactly when eval.suites contains 'jsonl' "
                             f"(suites={self.suites}, jsonl_paths={self.jsonl_paths})")
        if self.jsonl_max_items is not None and "jsonl" not in self.suites:
            raise ValueError("eval.jsonl_max_items is set but the jsonl suite is not in eval.suites; remove it")
        if self.jsonl_max_items is not None and self.jsonl_max_items < 1:
            raise ValueError("eval.jsonl_max_items must be >= 1 or null (all rows)")
        if self.jsonl_layout != "as_given" and "jsonl" not in self.suites:
            raise ValueError(f"eval.jsonl_layout={self.jsonl_layout} is set but the jsonl suite is not in eval.suites; "
                             "remove it")
        if self.jsonl_distractor_pool_path is not None:
            if self.jsonl_layout != "sweep":
                raise ValueError("eval.jsonl_distractor_pool_path only fills contexts with eval.jsonl_layout=sweep; "
                                 "set eval.jsonl_layout=sweep or remove it")
            if not isinstance(self.jsonl_distractor_pool_path, str) or not self.jsonl_distractor_pool_path:
                raise ValueError("eval.jsonl_distractor_pool_path must name a JSONL/Parquet file of documents, or be "
                                 "null (the other rows' documents)")

    def _check_ruler(self) -> None:
        tasks = {ruler_task_of(s) for s in self.suites} - {None}
        for name in ("num_distractors", "num_values", "num_hops"):
            users = [t for t in RULER_TASKS if name in RULER_DEFAULTS[t]]
            if getattr(self, f"ruler_{name}") is not None and not tasks & set(users):
                raise ValueError(f"eval.ruler_{name} is set but no suite uses it (it sizes "
                                 f"{', '.join(f'ruler_{t}' for t in users)}); remove it or add such a suite")
        for task in sorted(tasks):
            try:
                self.ruler_spec(task)
            except ValueError as err:
                raise ValueError(f"eval.ruler_{err} (suite ruler_{task})") from None

    def ruler_spec(self, task: str) -> RulerSpec:
        """The RULER task of a ruler suite with this section's settings (those the task does not use dropped)."""
        used = RULER_DEFAULTS[task]
        values = {name: getattr(self, f"ruler_{name}") for name in ("num_distractors", "num_values", "num_hops")
                  if name in used}
        return RulerSpec(task, **values)

    def _check_numbers(self) -> None:
        for name in ("num_samples", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"eval.{name} must be a positive integer, got {value!r}")
        if not self.context_lengths or any(n < 16 for n in self.context_lengths):
            raise ValueError(f"eval.context_lengths={self.context_lengths!r} must be a non-empty list of token "
                             "counts >= 16")
        if sorted(set(self.context_lengths)) != list(self.context_lengths):
            raise ValueError(f"eval.context_lengths={self.context_lengths!r} must be increasing without repeats")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"eval.depths={self.depths!r} must be a non-empty list of values in [0, 1]")
        if len(set(self.depths)) != len(self.depths):
            raise ValueError(f"eval.depths={self.depths!r} lists a depth twice")
        hops = self.num_hops
        if len(hops) != 2 or not 1 <= hops[0] <= hops[1]:
            raise ValueError(f"eval.num_hops={hops!r} must be [min, max] with 1 <= min <= max")
        if "niah_multi" in self.suites and hops[0] < 2:
            raise ValueError("eval.suites has niah_multi (multi-document questions) but eval.num_hops starts "
                             f"at {hops[0]}; set eval.num_hops=[2, {max(2, hops[1])}]")
        if not 0.0 < self.length_tolerance < 1.0:
            raise ValueError("eval.length_tolerance must be in (0, 1), e.g. 0.05 for 5%")
        if not self.output_dir:
            raise ValueError("eval.output_dir must name a directory")

    @property
    def long_suites(self) -> list[str]:
        """The configured suites that run at every context length."""
        return [s for s in self.suites if s in LONG_SUITES]


def ruler_task_of(suite: str) -> str | None:
    """The RULER task of a ruler_<task> or ruler_<task>_short suite; None for other suites."""
    if suite in RULER_SUITES:
        return suite[len("ruler_"):]
    if suite in RULER_SHORT_SUITES:
        return suite[len("ruler_"):-len("_short")]
    return None
