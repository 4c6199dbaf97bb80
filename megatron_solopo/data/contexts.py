"""Short and long contexts (the paper's x_short = [c_rel; I] and x_long = [c_rel, c_irr; I]).

* short: the supporting documents, shuffled, rendered with the document template, inside the prompt
  template with the question and instruction.
* long: the same supporting documents placed among distractor documents (the item's own
  non-supporting documents first, then a corpus pool) until the rendered prompt reaches a target
  length in tokens of the model's tokenizer (RULER-style haystack).

The evidence is never truncated: an item whose evidence does not fit the short budget or the long
target is skipped with a reason. Only the last distractor may be cut (at a word boundary) so the long
prompt lands within ``tolerance`` of its target.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from megatron_solopo.data.config import DEFAULT_DOC_TEMPLATE, DEFAULT_PROMPT_TEMPLATE
from megatron_solopo.data.records import Document, QAItem

__all__ = ["ContextTemplates", "TokenCounter", "LongContext", "ContextSkip", "render_documents", "render_prompt",
           "build_short_context", "build_long_context", "long_context_at_depth", "WorkedExample", "WORKED_EXAMPLES",
           "prompt_examples", "config_prompt_examples"]

# below this many tokens a cut distractor would be a title with a few words: not worth adding
_MIN_FILLER_TOKENS = 8
_MAX_FIT_PASSES = 5
_SMALL_POOL = 4096


@dataclasses.dataclass(frozen=True)
class ContextTemplates:
    """How documents and prompts are rendered (see DataConfig for the placeholders)."""

    document: str = DEFAULT_DOC_TEMPLATE
    separator: str = "\n\n"
    prompt: str = DEFAULT_PROMPT_TEMPLATE

    @classmethod
    def from_config(cls, config: Any) -> "ContextTemplates":
        return cls(config.doc_template, config.doc_separator, config.prompt_template)


class TokenCounter:
    """Counts tokens of text with a tokenizer (no special tokens), caching per string.

    Accepts a Hugging Face tokenizer or any callable text -> token count.
    """

    def __init__(self, tokenizer: Any, cache_limit: int = 1_000_000, max_cached_chars: int = 16_384) -> None:
        if callable(tokenizer) and not hasattr(tokenizer, "encode"):
            self._count = tokenizer
        else:
            self._count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))
        self._cache: dict[str, int] = {}
        self._cache_limit = cache_limit
        # documents repeat (pool documents across items); whole long prompts never do and are large
        self._max_cached_chars = max_cached_chars

    def __call__(self, text: str) -> int:
        cached = self._cache.get(text)
        if cached is None:
            cached = self._count(text)
            if len(text) <= self._max_cached_chars and len(self._cache) < self._cache_limit:
                self._cache[text] = cached
        return cached


class ContextSkip(Exception):
    """An item cannot get a valid context; `reason` is a short key counted in the summary."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def render_documents(docs: Sequence[Document], templates: ContextTemplates) -> str:
    return templates.separator.join(templates.document.format(index=i + 1, title=d.title, text=d.text)
                                    for i, d in enumerate(docs))


def render_prompt(question: str, docs: Sequence[Document], templates: ContextTemplates) -> str:
    """The user prompt: documents (numbered 1..n in this order) and the question in the prompt template."""
    return templates.prompt.format(documents=render_documents(docs, templates), question=question)


@dataclasses.dataclass(frozen=True)
class WorkedExample:
    """A solved question shown to the model before the real one (a few-shot turn pair)."""

    documents: tuple[Document, ...]
    question: str
    response: str
    """The assistant's answer: short reasoning, then the "Answer: ..." line the scorer parses."""


# Fictional entities (no overlap with the synthetic generator's namespaces or any eval set): one 2-hop
# and one 1-hop question, answered the way pairs are scored (reasoning, then "Answer: <short answer>").
WORKED_EXAMPLES = (
    WorkedExample(
        documents=(Document("Velmora", "Velmora is a country on the northern coast. The capital of Velmora is "
                                       "Dashkent. Its winters are long and dry."),
                   Document("Quorra River", "The Quorra River flows through the east of Velmora. Fishing "
                                            "villages line its banks."),
                   Document("Dashkent", "Dashkent is a city known for its glass markets. The mayor of Dashkent "
                                        "is Orin Talvek.")),
        question="Who is the mayor of the capital of Velmora?",
        response="The capital of Velmora is Dashkent. The mayor of Dashkent is Orin Talvek.\nAnswer: Orin Talvek"),
    WorkedExample(
        documents=(Document("Tessaly Brandt", "Tessaly Brandt is a painter. Tessaly Brandt was born in Ombrisk."),
                   Document("Ombrisk", "Ombrisk is a mountain town with a famous clock tower.")),
        question="Where was Tessaly Brandt born?",
        response="The document about Tessaly Brandt says she was born in Ombrisk.\nAnswer: Ombrisk"),
)


def prompt_examples(num_examples: int, templates: ContextTemplates) -> tuple[tuple[str, str], ...]:
    """The first `num_examples` worked examples as (user prompt, assistant response) turns, rendered
    with the same templates as the real prompts (so the model sees the format it must follow)."""
    if not 0 <= num_examples <= len(WORKED_EXAMPLES):
        raise ValueError(f"num_examples={num_examples} must be in [0, {len(WORKED_EXAMPLES)}]")
    return tuple((render_prompt(ex.question, ex.documents, templates), ex.response)
                 for ex in WORKED_EXAMPLES[:num_examples])


def config_prompt_examples(config: Any) -> tuple[tuple[str, str], ...]:
    """The worked-example turns a data section asks for (`num_prompt_examples`, its templates)."""
    return prompt_examples(config.num_prompt_examples, ContextTemplates.from_config(config))


def build_short_context(item: QAItem, counter: TokenCounter, max_tokens: int, rng: random.Random,
                        templates: ContextTemplates = ContextTemplates()) -> tuple[str, int]:
    """(x_short, its token count): the shuffled evidence with the question; ContextSkip if over budget."""
    evidence = list(item.supporting_docs)
    rng.shuffle(evidence)
    text = render_prompt(item.question, evidence, templates)
    num_tokens = counter(text)
    if num_tokens > max_tokens:
        raise ContextSkip("short_context_over_budget",
                          f"item {item.id}: short prompt has {num_tokens} tokens > data.short_max_tokens={max_tokens}")
    return text, num_tokens


@dataclasses.dataclass
class LongContext:
    """A long prompt and where its evidence sits."""

    text: str
    num_tokens: int
    target_tokens: int
    evidence_positions: list[int]
    """0-based document positions of the supporting docs in the rendered order."""
    evidence_depths: list[float]
    """Per supporting doc: tokens of documents before it / tokens of all documents (0 = first)."""
    num_documents: int
    truncated_distractor: bool
    """The last added distractor was cut at a word boundary to hit the target."""

    def meta(self) -> dict[str, Any]:
        return {"long_tokens": self.num_tokens, "long_target_tokens": self.target_tokens,
                "evidence_positions": self.evidence_positions,
                "evidence_depths": [round(d, 4) for d in self.evidence_depths],
                "long_num_documents": self.num_documents, "truncated_distractor": self.truncated_distractor}


def _candidates(item: QAItem, pool: Sequence[Document], rng: random.Random) -> Iterator[Document]:
    """Distractors in the order they are tried: own (shuffled), then the pool (random, lazily)."""
    evidence_texts = {d.text for d in item.supporting_docs}
    seen: set[str] = set(evidence_texts)
    own = list(item.distractor_docs)
    rng.shuffle(own)

    def fresh(doc: Document) -> bool:
        if doc.text in seen:
            return False
        seen.add(doc.text)
        return True

    yield from (d for d in own if fresh(d))
    if len(pool) <= _SMALL_POOL:
        order = list(range(len(pool)))
        rng.shuffle(order)
        yield from (pool[i] for i in order if fresh(pool[i]))
        return
    # large pools: sample indices lazily instead of shuffling millions of entries per item
    drawn: set[int] = set()
    for _ in range(4 * len(pool)):
        index = rng.randrange(len(pool))
        if index not in drawn:
            drawn.add(index)
            if fresh(pool[index]):
                yield pool[index]


def _truncate(doc: Document, max_tokens: int, cost: Callable[[Document], int]) -> Document | None:
    """The longest word prefix of `doc` whose rendered cost fits `max_tokens` (None if none does)."""
    words = doc.text.split(" ")
    low, high = 0, len(words) - 1  # a cut keeps at least one word fewer than the whole
    best = None
    while low < high:
        mid = (low + high + 1) // 2
        candidate = Document(doc.title, " ".join(words[:mid]))
        if cost(candidate) <= max_tokens:
            best, low = candidate, mid
        else:
            high = mid - 1
    return best


def _select_distractors(candidates: list[Document], candidate_iter: Iterator[Document], budget: int,
                        cost: Callable[[Document], int]) -> tuple[list[Document], bool]:
    """Greedy fill of `budget` tokens with whole documents, then one cut document for the rest.

    `candidates` caches what `candidate_iter` produced so later passes (with a corrected budget)
    see the same order.
    """
    chosen: list[Document] = []
    used = 0
    index = 0
    while True:
        if index == len(candidates):
            nxt = next(candidate_iter, None)
            if nxt is None:
                return chosen, False
            candidates.append(nxt)
        doc = candidates[index]
        index += 1
        doc_cost = cost(doc)
        if used + doc_cost <= budget:
            chosen.append(doc)
            used += doc_cost
            continue
        remaining = budget - used
        if remaining >= _MIN_FILLER_TOKENS:
            cut = _truncate(doc, remaining, cost)
            if cut is not None:
                chosen.append(cut)
                return chosen, True
        return chosen, False


def _place_evidence(evidence: list[Document], distractors: list[Document], depth: float | None,
                    rng: random.Random, cost: Callable[[Document], int]) -> list[Document]:
    """Inserts the evidence among the distractors: at random slots, or as one block at a token depth."""
    if depth is None:
        slots = sorted(rng.randint(0, len(distractors)) for _ in evidence)
        out: list[Document] = []
        start = 0
        for slot, doc in zip(slots, evidence, strict=True):
            out.extend(distractors[start:slot])
            out.append(doc)
            start = slot
        return out + distractors[start:]
    total = sum(cost(d) for d in distractors)
    best_slot, best_gap, before = 0, float("inf"), 0
    for slot in range(len(distractors) + 1):
        gap = abs(before - depth * total)
        if gap < best_gap:
            best_slot, best_gap = slot, gap
        if slot < len(distractors):
            before += cost(distractors[slot])
    return distractors[:best_slot] + evidence + distractors[best_slot:]


def _evidence_layout(docs: list[Document], evidence: list[Document], cost: Callable[[Document], int]
                     ) -> tuple[list[int], list[float]]:
    ids = {id(d) for d in evidence}
    costs = [cost(d) for d in docs]
    total = sum(costs) or 1
    positions, depths, before = [], [], 0
    for pos, (doc, doc_cost) in enumerate(zip(docs, costs, strict=True)):
        if id(doc) in ids:
            positions.append(pos)
            depths.append(before / total)
        before += doc_cost
    return positions, depths


def build_long_context(item: QAItem, counter: TokenCounter, target_tokens: int, rng: random.Random,
                       pool: Sequence[Document] = (), depth: float | None = None, tolerance: float = 0.05,
                       templates: ContextTemplates = ContextTemplates()) -> LongContext:
    """x_long for `item`: evidence among distractors, `target_tokens` long within `tolerance`.

    Args:
        item: the QA item; its supporting docs all appear intact, its distractor docs are used first (and
            placed first, unless item.spread_distractors: then all selected distractors are shuffled).
        counter: token counter of the model's tokenizer (lengths are of the rendered user prompt).
        target_tokens: desired prompt length in tokens.
        rng: drives document order and (for depth=None) evidence slots.
        pool: further distractor documents (e.g. other items' paragraphs or a corpus).
        depth: None = each supporting doc at a random slot; a float in [0, 1] = the supporting docs as
            one contiguous block with that fraction of the distractor tokens before it.
        tolerance: accepted |length - target| / target.

    Raises ContextSkip (reason evidence_over_long_target | not_enough_distractors | length_miss).
    """
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1] (or None for random positions)")
    evidence = list(item.supporting_docs)
    rng.shuffle(evidence)
    base_tokens = counter(render_prompt(item.question, evidence, templates))
    if base_tokens > target_tokens * (1 + tolerance):
        raise ContextSkip("evidence_over_long_target",
                          f"item {item.id}: evidence prompt has {base_tokens} tokens > long target {target_tokens}")
    sep_tokens = _separator_cost(counter, templates)

    def cost(doc: Document) -> int:
        return counter(templates.document.format(index=1, title=doc.title, text=doc.text)) + sep_tokens

    candidate_iter = _candidates(item, pool, rng)
    candidates: list[Document] = []
    placement_seed = rng.getrandbits(64)
    budget = target_tokens - base_tokens
    lowest = target_tokens * (1 - tolerance)
    for _ in range(_MAX_FIT_PASSES):
        distractors, truncated = _select_distractors(candidates, candidate_iter, budget, cost)
        if item.spread_distractors:  # own distractors (selected first) spread through the filler
            random.Random(f"{placement_seed}:spread").shuffle(distractors)
        docs = _place_evidence(evidence, distractors, depth, random.Random(placement_seed), cost)
        text = render_prompt(item.question, docs, templates)
        num_tokens = counter(text)
        if abs(num_tokens - target_tokens) <= tolerance * target_tokens:
            positions, depths = _evidence_layout(docs, evidence, cost)
            return LongContext(text, num_tokens, target_tokens, positions, depths, len(docs), truncated)
        if num_tokens < lowest and not truncated and len(distractors) == len(candidates):
            raise ContextSkip("not_enough_distractors",
                              f"item {item.id}: all {len(candidates)} distractors give {num_tokens} tokens < "
                              f"{lowest:.0f} (target {target_tokens}); add a distractor pool "
                              "(data.distractor_pool_path) or lower data.long_target_tokens")
        budget -= num_tokens - target_tokens  # per-document estimates drifted: correct and refill
    raise ContextSkip("length_miss", f"item {item.id}: could not reach {target_tokens} tokens within "
                                     f"{tolerance:.0%} (last: {num_tokens})")


def _separator_cost(counter: TokenCounter, templates: ContextTemplates) -> int:
    """Tokens a separator adds between two documents, measured in context (BPE merges across joins)."""
    a = templates.document.format(index=1, title="Alpha", text="The first document ends here.")
    b = templates.document.format(index=2, title="Beta", text="The second document starts here.")
    return max(0, counter(a + templates.separator + b) - counter(a) - counter(b))


def long_context_at_depth(item: QAItem, tokenizer: Any, target_tokens: int, depth: float, seed: int = 0,
                          pool: Sequence[Document] = (), tolerance: float = 0.05,
                          templates: ContextTemplates = ContextTemplates()) -> LongContext:
    """Eval helper: x_long at `target_tokens` with the evidence block at `depth` (0.0 start .. 1.0 end).

    `tokenizer` is a Hugging Face tokenizer (or a TokenCounter). Deterministic given `seed`. Use it
    for depth sweeps: same item and seed at depths 0.0, 0.25, ... select the same distractors in the
    same order and move only the evidence block (up to the last, cut distractor, whose cut point may
    shift by a few tokens to keep the length on target).
    """
    counter = tokenizer if isinstance(tokenizer, TokenCounter) else TokenCounter(tokenizer)
    return build_long_context(item, counter, target_tokens, random.Random(seed), pool=pool, depth=depth,
                              tolerance=tolerance, templates=templates)
