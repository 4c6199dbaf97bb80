"""RULER-style synthetic long-context tasks (needles, variable tracking, fact lookup), offline from a seed.

RULER (Hsieh et al. 2024) and the SoLoPO paper's NIAH-Plus test retrieval and tracking over long
haystacks. Here every task is a `QAItem` like any other source, so the existing pipeline builds its
contexts: x_short = the evidence documents + question (`contexts.build_short_context`), x_long = the
evidence among filler documents at a token depth or at random slots, up to a token budget
(`contexts.build_long_context`, `long_context_at_depth`). Tasks (`RULER_TASKS`):

* ``niah_single`` -- one needle "The special magic number for <key> is <7 digits>." hidden in a
  paragraph; "What is the special magic number for <key> ...?". Answer: the number.
* ``niah_multikey`` -- the same needle plus `num_distractors` needles with other keys (and values)
  in the haystack only (RULER niah_multikey_1: 3 other keys). Answer: the asked key's number.
* ``niah_multivalue`` -- `num_values` needles with one key and different numbers (RULER
  niah_multivalue: 4); every number must be returned (``answer_match="all"``).
* ``variable_tracking`` -- a chain "VAR A = 12345.", "VAR B = VAR A.", ... of `num_hops` copies
  (RULER: 4), plus `num_distractors` other chains with other values in the haystack; "Find all
  variables that are assigned the value 12345": every name of the chain (``answer_match="all"``).
  The chain's statements appear in random order, in x_short as in x_long.
* ``qa`` -- fact lookup: a one-hop question of the synthetic generator (`synthetic.py`) whose one
  supporting document sits among `num_distractors` decoys (near-namesakes stating the same relation
  with another value first) and the filler.

Needles are not bare lines: each is one sentence inserted at a random sentence boundary of a
paragraph (a "host" document about a fictional entity), as RULER hides needles in essays. The
filler (the haystack) is further such paragraphs: documents of the synthetic generator, drawn in the
same generator call as the hosts and (for ``qa``) the questions, so no fictional entity of a question
is named in the filler. Distractor needles and decoys are the item's own distractor documents with
``spread_distractors=True``: they are taken into x_long before any filler (so always, when the
length has room for them) and spread at random through it; never in x_short. Keys are an adjective and a fictional word of the item's entity namespace ("amber-vorath");
variable names are five random capitals (RULER). Deterministic given (task settings, count, seed,
namespace, haystack size) on any machine, and prefix-stable: the first k of n items are the k items
asked for alone (the filler may differ).
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import string

from megatron_solopo.data.records import Document, QAItem
# _Namer: the synthetic generator's fictional words of a namespace, so keys are held out like its entities
from megatron_solopo.data.synthetic import NAMESPACES, _Namer, generate_synthetic_qa

__all__ = ["RULER_TASKS", "RULER_DEFAULTS", "RulerSpec", "RulerSource", "generate_ruler", "needles_per_item",
           "FILLER_CHARS_PER_TOKEN"]

RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "qa")
RULER_DEFAULTS: dict[str, dict[str, int]] = {
    "niah_single": {},
    "niah_multikey": {"num_distractors": 3},
    "niah_multivalue": {"num_values": 4},
    "variable_tracking": {"num_hops": 4, "num_distractors": 1},
    "qa": {"num_distractors": 4},
}
"""The settings each task uses and their defaults (RULER's, except variable_tracking's one other chain:
RULER's default has none, which makes "every VAR line" the answer)."""
FILLER_CHARS_PER_TOKEN = 6.0
"""Filler characters generated per token of haystack asked for: English BPE averages 4-5 characters per
token, so the filler outlasts the longest context with a margin (the builder skips, never repeats)."""

_MIN_SETTING = {"num_distractors": 0, "num_values": 2, "num_hops": 1}
_KEY_ADJECTIVES = ("amber", "brisk", "crimson", "distant", "eager", "frozen", "gilded", "hollow", "idle", "jolly",
                   "keen", "lucid", "mellow", "narrow", "olive", "pale", "quiet", "rustic", "silent", "tawny",
                   "umber", "velvet", "wild", "young")
_FILLER_DISTRACTORS = 8  # documents per synthetic item drawn for hosts and filler (1 supporting + these)
# a sentence ends at . ! ? or a closing parenthesis after one, followed by a capital; not after an
# initial ("O. Vigraeon")
_SENTENCE_END = re.compile(r"(?<=[.!?)])(?<!\s[A-Z]\.)\s+(?=[A-Z])")


@dataclasses.dataclass(frozen=True)
class RulerSpec:
    """One task and its size settings; a setting the task does not use must stay None."""

    task: str
    """One of RULER_TASKS."""
    num_distractors: int | None = None
    """niah_multikey: needles with other keys; variable_tracking: other chains (other values); qa: decoy
    documents. None: the task's default (RULER_DEFAULTS)."""
    num_values: int | None = None
    """niah_multivalue: needles (numbers) for the one key, all required. None: 4."""
    num_hops: int | None = None
    """variable_tracking: copies in the chain (it names num_hops + 1 variables, all required). None: 4."""

    def __post_init__(self) -> None:
        if self.task not in RULER_TASKS:
            raise ValueError(f"RULER task {self.task!r} is not one of {', '.join(RULER_TASKS)}")
        used = RULER_DEFAULTS[self.task]
        for name, low in _MIN_SETTING.items():
            value = getattr(self, name)
            if value is None:
                continue
            if name not in used:
                raise ValueError(f"{name} is not used by the RULER task {self.task} (it uses "
                                 f"{', '.join(used) or 'no setting'}); leave it null")
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low} for {self.task}, got {value!r}")
        if self.task == "niah_multikey" and self.setting("num_distractors") < 1:
            raise ValueError("num_distractors must be >= 1 for niah_multikey (other keys' needles); "
                             "use niah_single for a lone needle")

    def setting(self, name: str) -> int:
        """The value of a setting the task uses (its default when None)."""
        if name not in RULER_DEFAULTS[self.task]:
            raise KeyError(f"{name} is not a setting of the RULER task {self.task}")
        value = getattr(self, name)
        return RULER_DEFAULTS[self.task][name] if value is None else value

    @property
    def answer_match(self) -> str:
        """all for the multi-answer tasks (every value / variable required), else any."""
        return "all" if self.task in ("niah_multivalue", "variable_tracking") else "any"

    @property
    def min_answer_words(self) -> int:
        """Words of the shortest complete final answer (the values or names, one word each)."""
        if self.task == "niah_multivalue":
            return self.setting("num_values")
        if self.task == "variable_tracking":
            return self.setting("num_hops") + 1
        return 1


@dataclasses.dataclass
class RulerSource:
    """Generated items and the filler documents their long contexts are filled with (the pool)."""

    items: list[QAItem]
    filler: list[Document]


# ------------------------------------------------------------------------------------------ pieces
def _insert_sentence(doc: Document, sentence: str, rng: random.Random) -> Document:
    """`doc` with `sentence` inserted at a random sentence boundary (start and end included)."""
    sentences = _SENTENCE_END.split(doc.text.strip())
    sentences.insert(rng.randint(0, len(sentences)), sentence)
    return Document(doc.title, " ".join(sentences))


def _distinct(draw, count: int, taken: set) -> list:
    out = []
    while len(out) < count:
        value = draw()
        if value not in taken:
            taken.add(value)
            out.append(value)
    return out


class _Draws:
    """Keys, numbers and variable names, never repeated within one item."""

    def __init__(self, rng: random.Random, namespace: str) -> None:
        self.rng = rng
        self.namer = _Namer(rng, namespace)
        self.taken: set = set()

    def keys(self, count: int) -> list[str]:
        return _distinct(lambda: f"{self.rng.choice(_KEY_ADJECTIVES)}-{self.namer.core().lower()}", count, self.taken)

    def numbers(self, count: int, digits: int) -> list[str]:
        return _distinct(lambda: str(self.rng.randrange(10 ** (digits - 1), 10 ** digits)), count, self.taken)

    def names(self, count: int) -> list[str]:
        return _distinct(lambda: "".join(self.rng.choices(string.ascii_uppercase, k=5)), count, self.taken)


def _magic(key: str, value: str) -> str:
    return f"The special magic number for {key} is {value}."


def _chain(names: list[str], value: str) -> list[str]:
    """VAR statements: the first name gets the value, each next one copies the previous one."""
    return [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]


def _needle_item(spec: RulerSpec, item_id: str, draws: _Draws, hosts: list[Document],
                 rng: random.Random) -> QAItem:
    """One needle-task item; `hosts` holds exactly the paragraphs its needles go into."""
    task = spec.task
    if task in ("niah_single", "niah_multikey"):
        others = spec.setting("num_distractors") if task == "niah_multikey" else 0
        keys = draws.keys(1 + others)
        values = draws.numbers(1 + others, 7)
        evidence = [_magic(keys[0], values[0])]
        distractors = [_magic(k, v) for k, v in zip(keys[1:], values[1:])]
        question = f"What is the special magic number for {keys[0]} mentioned in the documents?"
        answers = [values[0]]
    elif task == "niah_multivalue":
        key = draws.keys(1)[0]
        answers = draws.numbers(spec.setting("num_values"), 7)
        evidence, distractors = [_magic(key, v) for v in answers], []
        question = f"What are all the special magic numbers for {key} mentioned in the documents?"
    else:  # variable_tracking
        length = spec.setting("num_hops") + 1
        chains = 1 + spec.setting("num_distractors")
        values = draws.numbers(chains, 5)
        names = [draws.names(length) for _ in range(chains)]
        evidence = _chain(names[0], values[0])
        distractors = [s for n, v in zip(names[1:], values[1:]) for s in _chain(n, v)]
        question = (f"Find all variables that are assigned the value {values[0]} in the documents, directly or "
                    "through other variables. List their names.")
        answers = names[0]
    sentences = evidence + distractors
    if len(hosts) != len(sentences):
        raise AssertionError(f"{item_id}: {len(hosts)} host paragraphs for {len(sentences)} needles")
    docs = [_insert_sentence(host, sentence, rng) for host, sentence in zip(hosts, sentences)]
    meta = {"source": "ruler", "task": task, "num_hops": len(evidence), "needles": evidence,
            "distractor_needles": distractors}
    return QAItem(item_id, question, list(answers), docs[:len(evidence)], docs[len(evidence):], meta,
                  answer_match=spec.answer_match, spread_distractors=True)


def needles_per_item(spec: RulerSpec) -> int:
    """Host paragraphs one item of a needle task takes (evidence + distractor needles)."""
    if spec.task == "niah_single":
        return 1
    if spec.task == "niah_multikey":
        return 1 + spec.setting("num_distractors")
    if spec.task == "niah_multivalue":
        return spec.setting("num_values")
    if spec.task == "variable_tracking":
        return (spec.setting("num_hops") + 1) * (1 + spec.setting("num_distractors"))
    return 0


def _docs(items: list[QAItem]) -> list[Document]:
    return [d for item in items for d in (*item.supporting_docs, *item.distractor_docs)]


# ------------------------------------------------------------------------------------------ generator
def generate_ruler(spec: RulerSpec, num_items: int, seed: int, namespace: str = "train",
                   haystack_tokens: int = 8192) -> RulerSource:
    """`num_items` items of `spec.task` and the filler for their long contexts.

    Args:
        spec: the task and its settings.
        num_items: number of questions.
        seed: same arguments -> identical items and filler, on any machine.
        namespace: entity namespace of paragraphs, keys and (qa) questions: train | eval (disjoint).
        haystack_tokens: the longest long context the filler must fill (FILLER_CHARS_PER_TOKEN
            characters of filler are generated per token).
    """
    if namespace not in NAMESPACES:
        raise ValueError(f"namespace={namespace!r} is not one of {', '.join(NAMESPACES)}")
    if num_items < 1 or haystack_tokens < 1:
        raise ValueError(f"num_items ({num_items}) and haystack_tokens ({haystack_tokens}) must be >= 1")
    prefix = f"ruler-{spec.task}-{namespace}-{seed}"
    qa = spec.task == "qa"
    # questions (qa) or host paragraphs (needles) come first, the filler after: one generator call, so
    # no entity repeats, and the generator is prefix-stable, so growing the filler changes nothing else
    per_item_docs = 1 + (spec.setting("num_distractors") if qa else _FILLER_DISTRACTORS)
    step = needles_per_item(spec)
    hosts_from = 1 if qa else math.ceil(step / per_item_docs)  # synthetic items hosting one item's needles
    lead = num_items * hosts_from
    needed_chars = FILLER_CHARS_PER_TOKEN * haystack_tokens
    extra = max(1, math.ceil(needed_chars / (300 * per_item_docs)))
    while True:
        synthetic = generate_synthetic_qa(lead + extra, seed, num_hops=(1, 1), entity_namespace=namespace,
                                          num_distractors=per_item_docs - 1, id_prefix=f"{prefix}-syn")
        filler = _docs(synthetic[lead:])
        if sum(len(d.text) for d in filler) >= needed_chars:
            break
        extra *= 2
    if qa:
        items = [QAItem(f"{prefix}-{i:06d}", q.question, list(q.answers), list(q.supporting_docs),
                        list(q.distractor_docs), {**q.meta, "source": "ruler", "task": "qa"},
                        spread_distractors=True)
                 for i, q in enumerate(synthetic[:num_items])]
        return RulerSource(items, filler)
    items = []
    for i in range(num_items):  # item i depends only on (spec, seed, namespace, i): a prefix-stable list
        rng = random.Random(f"solopo-ruler-{spec.task}-{seed}-{namespace}-{i}")
        hosts = rng.sample(_docs(synthetic[i * hosts_from:(i + 1) * hosts_from]), step)
        items.append(_needle_item(spec, f"{prefix}-{i:06d}", _Draws(rng, namespace), hosts, rng))
    return RulerSource(items, filler)
