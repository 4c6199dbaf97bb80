"""The `data` section of an experiment config: sources, contexts, sampling, pairs, tokenization."""

from __future__ import annotations

import dataclasses
import re
import string

from megatron_solopo.data.ruler import RULER_TASKS, RulerSpec
from megatron_solopo.data.scoring import DEFAULT_ANSWER_REGEX, DEFAULT_MAX_ANSWER_WORDS

__all__ = ["DataConfig", "SOURCES", "EVIDENCE_POSITIONS", "SAMPLING_BACKENDS", "PAIR_STRATEGIES",
           "CORRECT_METRICS", "ON_TOO_LONG", "SAMPLE_ON", "DEFAULT_DOC_TEMPLATE", "DEFAULT_PROMPT_TEMPLATE",
           "template_fields"]

SOURCES = ("synthetic", "ruler", "musique", "generic")
FILE_SOURCES = ("musique", "generic")
EVIDENCE_POSITIONS = ("random", "depth")
SAMPLING_BACKENDS = ("auto", "hf", "vllm", "scripted")
PAIR_STRATEGIES = ("random", "shortest_correct", "prefer_no_answer_rejected")
CORRECT_METRICS = ("sub_em", "em")
ON_TOO_LONG = ("error", "skip")
SAMPLE_ON = ("short", "long")
DTYPES = ("auto", "fp32", "bf16", "fp16")

DEFAULT_DOC_TEMPLATE = "Document [{index}] (Title: {title}) {text}"
DEFAULT_PROMPT_TEMPLATE = (
    "Answer the question using the documents below.\n\n{documents}\n\nQuestion: {question}\n\n"
    "Think step by step, using only facts stated in the documents. Finish with a last line of the form "
    '"Answer: <final answer>".')


def template_fields(template: str) -> set[str]:
    """Names of the {placeholders} in a str.format template (raises ValueError if malformed)."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(DataConfig)]


def _check_template(name: str, template: str, required: set[str], allowed: set[str]) -> None:
    try:
        fields = template_fields(template)
    except ValueError as err:
        raise ValueError(f"data.{name} is not a valid format template ({err}); "
                         "write literal braces as {{{{ }}}}") from None
    missing, unknown = required - fields, fields - allowed
    if missing:
        raise ValueError(f"data.{name} must contain {', '.join('{' + f + '}' for f in sorted(missing))}")
    if unknown:
        raise ValueError(f"data.{name} has unknown placeholder(s) {', '.join('{' + f + '}' for f in sorted(unknown))}; "
                         f"allowed: {', '.join('{' + f + '}' for f in sorted(allowed))}")


@dataclasses.dataclass
class DataConfig:
    """How `solopo build-data` builds preference pairs and how training tokenizes them (docs/data.md)."""

    # ----------------------------------------------------------------------------- source
    source: str = "synthetic"
    """QA source: synthetic (built-in multi-hop generator, no download) | ruler (built-in RULER-style
    needle / variable-tracking / fact-lookup tasks, no download; data.ruler_*) | musique (MuSiQue
    JSONL as distributed) | generic (JSONL/JSON/Parquet with question, answers, supporting_docs)."""
    input_path: str | None = None
    """Input file for source=musique|generic (required there; must be null for synthetic and ruler)."""
    distractor_pool_path: str | None = None
    """Optional corpus of distractor documents (JSONL/Parquet rows with title and text). Null: the
    pool is the non-supporting documents of all items of the source (ruler: its generated filler)."""
    max_items: int | None = None
    """Use only the first N items of the source (null: all). For synthetic and ruler it is the item count."""
    synthetic_num_items: int = 64
    """source=synthetic: items generated when max_items is null."""
    synthetic_num_hops: list[int] = dataclasses.field(default_factory=lambda: [2, 4])
    """source=synthetic: inclusive [min, max] bridge facts per question."""
    synthetic_namespace: str = "train"
    """source=synthetic: entity namespace, train | eval (disjoint entities, for held-out eval sets)."""
    synthetic_num_distractors: int = 12
    """source=synthetic: each item's own distractor documents (near-namesake decoys first)."""
    synthetic_filler_sentences: list[int] = dataclasses.field(default_factory=lambda: [2, 4])
    """source=synthetic: inclusive [min, max] descriptive sentences per document (document length)."""
    ruler_task: str = "niah_single"
    """source=ruler: niah_single | niah_multikey | niah_multivalue | variable_tracking | qa
    (data.ruler; docs/data.md has each task's question, answer and scoring rule)."""
    ruler_num_items: int = 64
    """source=ruler: items generated when max_items is null."""
    ruler_namespace: str = "train"
    """source=ruler: entity namespace of paragraphs, keys and questions, train | eval (disjoint)."""
    ruler_num_distractors: int | None = None
    """source=ruler: niah_multikey: needles with other keys (null: 3) | variable_tracking: other chains
    with other values (null: 1) | qa: decoy documents (null: 4); other tasks: must stay null."""
    ruler_num_values: int | None = None
    """source=ruler, niah_multivalue only: numbers for the one key, all required (null: 4; >= 2)."""
    ruler_num_hops: int | None = None
    """source=ruler, variable_tracking only: copies in the chain, which names num_hops + 1 variables, all
    required (null: 4; >= 1)."""
    seed: int = 1234
    """Seed of every random choice: synthetic items, document order, evidence positions, sampling,
    pair selection. Same config + seed -> same output."""
    output_dir: str = "outputs/data"
    """build-data writes pairs.jsonl, summary.json, summary.png and samples.jsonl here."""
    pairs_path: str | None = None
    """Pairs JSONL that training tokenizes; null: {output_dir}/pairs.jsonl."""

    # ----------------------------------------------------------------------------- contexts
    short_max_tokens: int = 2048
    """Budget of the short prompt x_s (evidence + question + instruction) in tokenizer tokens. An item
    whose evidence exceeds it is skipped and counted (evidence is never truncated)."""
    long_target_tokens: list[int] = dataclasses.field(default_factory=lambda: [8192])
    """Target lengths of the long prompt x_l in tokens; each item draws one (seeded). Paper: ~7.5K."""
    long_length_tolerance: float = 0.05
    """Accepted relative distance of the long prompt's length to its target; items that cannot get
    within it (too few distractors) are skipped and counted."""
    evidence_position: str = "random"
    """Where the evidence goes in x_l: random (each supporting doc at a random slot, RULER style) |
    depth (all supporting docs as one block at a token depth taken from evidence_depths)."""
    evidence_depths: list[float] | None = None
    """evidence_position=depth: depths in [0, 1] assigned to items round-robin (0 = start). Must be
    null for random."""
    doc_template: str = DEFAULT_DOC_TEMPLATE
    """How one document is rendered; placeholders {index} (1-based position), {title}, {text}."""
    doc_separator: str = "\n\n"
    """Text between rendered documents."""
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    """The user prompt (x_s or x_l); placeholders {documents} and {question}. The default asks for
    chain-of-thought ending in "Answer: ..." (parsed by answer_regex)."""
    system_prompt: str | None = None
    """System message for sampling and tokenization (null: none)."""
    num_prompt_examples: int = 1
    """Worked examples (data.contexts.WORKED_EXAMPLES, rendered with the templates above) shown as earlier
    user/assistant turns before every prompt, in sampling, training and eval alike: 0 (none), 1 or 2.
    Small models follow the "Answer: ..." format far more often with one (docs/data.md)."""

    # ----------------------------------------------------------------------------- sampling
    sampling_backend: str = "auto"
    """auto (vllm when importable and CUDA is available, else hf) | hf (transformers generate, CPU or
    GPU) | vllm | scripted (responses written from synthetic bridge facts; demos/tests only)."""
    sampling_model: str | None = None
    """HF model directory that samples responses (hf/vllm) and whose tokenizer measures context lengths
    (all backends). Null: model.hf_model of the experiment, else the default model
    (SmolLM2-135M-Instruct from `solopo fetch-default-model`)."""
    sample_on: str = "short"
    """Context the responses are sampled on: short (SoLoPO, paper) | long (pairs for long-X baselines)."""
    num_responses: int = 32
    """Responses sampled per question (paper: 32)."""
    sampling_temperature: float = 0.85
    """Sampling temperature (paper: 0.85)."""
    sampling_top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    max_new_tokens: int = 512
    """Longest response in tokens; a response cut here usually lacks a final answer and scores 0."""
    sampling_batch_size: int = 32
    """Sequences per generate call (prompts x responses), the unit one seeded random generator draws for.
    Lower it if generation runs out of memory."""
    sampling_calls_per_batch: int = 4
    """hf backend: generate calls decoded together in one batch. Each call still draws from its own seeded
    generator over its own rows, so the samples do not depend on it (up to floating-point summation
    order); decoding several calls at once reads the weights once per step for all of them (2-core CPU,
    default model, 2 prompts x 8 responses per call: 4 calls together in ~0.7x the time of one at a time).
    Memory grows with it; 1 decodes one call at a time."""
    sampling_device: str = "auto"
    """hf backend device: auto (cuda if available) | cpu | cuda | cuda:N."""
    sampling_dtype: str = "auto"
    """hf/vllm weights dtype: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16."""

    # ----------------------------------------------------------------------------- scoring and pairs
    answer_regex: str = DEFAULT_ANSWER_REGEX
    """Regex (case-insensitive) whose last match's group 1 is a response's final answer."""
    max_answer_words: int | None = DEFAULT_MAX_ANSWER_WORDS
    """A final answer of more words than this counts as wrong (a copied passage, not an answer), so a
    response that pastes an evidence sentence after "Answer:" is never chosen; null: no limit."""
    correct_metric: str = "sub_em"
    """When a response counts as correct: sub_em (paper; a gold answer or alias inside the final
    answer) | em (exact match after normalization)."""
    pair_strategy: str = "random"
    """random (a random correct and a random incorrect) | shortest_correct (shortest correct chosen) |
    prefer_no_answer_rejected (rejected prefers refusals / missing final answers, as in the paper's
    example)."""

    # ----------------------------------------------------------------------------- tokenization
    use_chat_template: bool = True
    """Render prompts with the tokenizer's chat template (error if it has none); false: plain text
    prompt (with the tokenizer's BOS if it adds one) followed directly by the response."""
    max_seq_len_tokens: int | None = None
    """Longest tokenized sequence (prompt + response + EOS). Null: the tokenizer's model_max_length
    when it is a real limit (< 10**7), else no check."""
    on_too_long: str = "error"
    """A pair with a sequence over max_seq_len_tokens: error (stop with the id and lengths) | skip
    (drop it and count it in the cache's stats)."""
    cache_dir: str = ".cache/solopo_data"
    """Directory of the tokenized Arrow cache (keyed by tokenizer + tokenization config + pairs)."""

    def __post_init__(self) -> None:
        self._check_choices()
        self._check_source()
        self._check_numbers()
        self._check_positions()
        _check_template("doc_template", self.doc_template, {"text"}, {"index", "title", "text"})
        _check_template("prompt_template", self.prompt_template, {"documents", "question"}, {"documents", "question"})
        try:
            pattern = re.compile(self.answer_regex)
        except re.error as err:
            raise ValueError(f"data.answer_regex={self.answer_regex!r} is not a valid regex: {err}") from None
        if pattern.groups < 1:
            raise ValueError("data.answer_regex needs a capturing group (the final answer), e.g. 'answer:\\s*(.+)'")

    def _check_choices(self) -> None:
        for name, allowed in (("source", SOURCES), ("evidence_position", EVIDENCE_POSITIONS),
                              ("sampling_backend", SAMPLING_BACKENDS), ("pair_strategy", PAIR_STRATEGIES),
                              ("correct_metric", CORRECT_METRICS), ("on_too_long", ON_TOO_LONG),
                              ("sample_on", SAMPLE_ON), ("sampling_dtype", DTYPES),
                              ("synthetic_namespace", ("train", "eval")), ("ruler_task", RULER_TASKS),
                              ("ruler_namespace", ("train", "eval"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"data.{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.sampling_device):
            raise ValueError(f"data.sampling_device={self.sampling_device!r}: use auto, cpu, cuda or cuda:N")
        if self.sampling_backend == "vllm" and self.sampling_device != "auto":
            raise ValueError("data.sampling_device is for the hf backend; vLLM places the model itself "
                             "(use CUDA_VISIBLE_DEVICES), so leave data.sampling_device=auto")

    def _check_source(self) -> None:
        if self.source not in FILE_SOURCES and self.input_path is not None:
            raise ValueError(f"data.input_path is set but data.source={self.source} does not read files; "
                             "set data.source=musique|generic or data.input_path=null")
        if self.source in FILE_SOURCES and not self.input_path:
            raise ValueError(f"data.source={self.source} needs data.input_path (the {self.source} file)")
        if self.sampling_backend == "scripted" and self.source != "synthetic":
            raise ValueError("data.sampling_backend=scripted writes responses from synthetic bridge facts; "
                             "it needs data.source=synthetic (use hf or vllm for real data)")
        if self.source != "synthetic":
            self._reject_set_fields([f for f in _field_names() if f.startswith("synthetic_")],
                                    f"data.source={self.source}")
        if self.source != "ruler":
            self._reject_set_fields([f for f in _field_names() if f.startswith("ruler_")],
                                    f"data.source={self.source}")
        else:
            self._check_ruler()
        if self.sampling_backend == "scripted":
            self._reject_set_fields(["sampling_temperature", "sampling_top_p", "max_new_tokens",
                                     "sampling_batch_size", "sampling_calls_per_batch", "sampling_device",
                                     "sampling_dtype"],
                                    "data.sampling_backend=scripted")
        hops = self.synthetic_num_hops
        if len(hops) != 2 or not 1 <= hops[0] <= hops[1]:
            raise ValueError(f"data.synthetic_num_hops={hops!r} must be [min, max] with 1 <= min <= max")
        filler = self.synthetic_filler_sentences
        if len(filler) != 2 or not 0 <= filler[0] <= filler[1]:
            raise ValueError(f"data.synthetic_filler_sentences={filler!r} must be [min, max] with 0 <= min <= max")

    def _check_ruler(self) -> None:
        if isinstance(self.ruler_num_items, bool) or self.ruler_num_items < 1:
            raise ValueError(f"data.ruler_num_items must be >= 1, got {self.ruler_num_items}")
        try:
            spec = self.ruler_spec
        except ValueError as err:
            raise ValueError(f"data.ruler_{err} (data.ruler_task={self.ruler_task})") from None
        if self.max_answer_words is not None and self.max_answer_words < spec.min_answer_words:
            raise ValueError(f"data.max_answer_words={self.max_answer_words} is below the {spec.min_answer_words} "
                             f"values a complete {self.ruler_task} answer lists, so every correct response would "
                             f"score 0; raise it (e.g. {2 * spec.min_answer_words + 2}) or set it to null")

    @property
    def ruler_spec(self) -> RulerSpec:
        """The RULER task of source=ruler (ValueError naming the setting when it does not fit the task)."""
        return RulerSpec(self.ruler_task, self.ruler_num_distractors, self.ruler_num_values, self.ruler_num_hops)

    def _reject_set_fields(self, names: list[str], reason: str) -> None:
        """Fields that would be ignored must keep their defaults (no knob is silently ignored)."""
        for f in dataclasses.fields(DataConfig):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.name in names and getattr(self, f.name) != default:
                raise ValueError(f"data.{f.name} is set but unused with {reason}; remove it from the config")

    def _check_numbers(self) -> None:
        positive = ("short_max_tokens", "num_responses", "max_new_tokens", "sampling_batch_size",
                    "sampling_calls_per_batch", "synthetic_num_items")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_responses < 2:
            raise ValueError("data.num_responses must be >= 2: a pair needs a correct and an incorrect response")
        if self.max_items is not None and self.max_items < 1:
            raise ValueError("data.max_items must be >= 1 or null (all items)")
        if self.max_answer_words is not None and self.max_answer_words < 1:
            raise ValueError("data.max_answer_words must be >= 1 or null (no limit)")
        # deferred: data/contexts.py imports this module's templates at its top (a cycle otherwise)
        from megatron_solopo.data.contexts import WORKED_EXAMPLES

        if not 0 <= self.num_prompt_examples <= len(WORKED_EXAMPLES):
            raise ValueError(f"data.num_prompt_examples must be in [0, {len(WORKED_EXAMPLES)}], got "
                             f"{self.num_prompt_examples}")
        if self.synthetic_num_distractors < 0:
            raise ValueError("data.synthetic_num_distractors must be >= 0")
        if not self.long_target_tokens or any(t < 1 for t in self.long_target_tokens):
            raise ValueError(f"data.long_target_tokens={self.long_target_tokens!r} must be a non-empty list of "
                             "positive token counts")
        if not 0.0 < self.long_length_tolerance < 1.0:
            raise ValueError("data.long_length_tolerance must be in (0, 1), e.g. 0.05 for 5%")
        if self.sampling_temperature <= 0:
            raise ValueError("data.sampling_temperature must be > 0: greedy decoding would give num_responses "
                             "identical answers (no pair)")
        if not 0.0 < self.sampling_top_p <= 1.0:
            raise ValueError("data.sampling_top_p must be in (0, 1]")
        if self.max_seq_len_tokens is not None and self.max_seq_len_tokens < 2:
            raise ValueError("data.max_seq_len_tokens must be >= 2 or null")

    def _check_positions(self) -> None:
        if self.evidence_position == "depth":
            if not self.evidence_depths:
                raise ValueError("data.evidence_position=depth needs data.evidence_depths, e.g. [0.0, 0.5, 1.0]")
            bad = [d for d in self.evidence_depths if not 0.0 <= d <= 1.0]
            if bad:
                raise ValueError(f"data.evidence_depths has values outside [0, 1]: {bad}")
        elif self.evidence_depths is not None:
            raise ValueError("data.evidence_depths is only used with data.evidence_position=depth; "
                             "set evidence_position=depth or evidence_depths=null")

    @property
    def resolved_pairs_path(self) -> str:
        """pairs_path, or {output_dir}/pairs.jsonl when it is null."""
        return self.pairs_path or f"{self.output_dir.rstrip('/')}/pairs.jsonl"
