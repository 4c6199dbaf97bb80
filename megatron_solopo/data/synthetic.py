"""Synthetic multi-hop QA: fictional entities, bridge facts, 2-4 hop compositional questions.

Why synthetic: the pipeline, the tests and the demo must run with no downloaded data, and an
evaluation set must be answerable only from the given documents (fictional entities leave the model
no parametric shortcut). Each item is a chain of ``k`` bridge facts::

    anchor --r1--> e1 --r2--> e2 ... --rk--> answer
    "In what year was the organization that employs the author of The Lantern of Orsel founded?"

One supporting document per hop describes the hop's subject and states its bridge fact (plus side
facts about other relations and descriptive filler). Hard distractor documents describe entities with
near-identical names (one syllable changed) stating the same relations with other values, and
unrelated fictional entities. Every entity name is built around a "core" word; a hash of the core
decides its namespace, so the ``train`` and ``eval`` namespaces share no entity (and no alias).

``meta["hops"]`` lists the bridge facts as ``{"subject", "relation", "object", "fact"}`` so tests
and the ``scripted`` response backend can follow the chain.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Sequence

from megatron_solopo.data.records import Document, QAItem

__all__ = ["generate_synthetic_qa", "scripted_responses", "NAMESPACES", "RELATIONS", "entity_namespace_of"]

NAMESPACES = ("train", "eval")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr",
           "st", "th", "tr", "sh", "h", "j")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou", "ia")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "k", "m", "nd", "rn")
_FIRST_NAMES = ("Maren", "Talia", "Oskar", "Linnea", "Basil", "Corin", "Edda", "Feliks", "Greta", "Henrik",
                "Ines", "Jorun", "Kasimir", "Liv", "Mattis", "Nadia", "Odile", "Pavel", "Quilla", "Runa",
                "Soren", "Tove", "Ulric", "Vesna", "Wilma", "Yaro", "Zelda", "Anouk", "Bram", "Dagny")
_ADJECTIVES = ("Silent", "Crimson", "Hollow", "Amber", "Distant", "Gilded", "Broken", "Northern", "Quiet",
               "Burning", "Frozen", "Hidden", "Last", "Iron", "Pale", "Velvet", "Wandering", "Salt")
_NOUNS = ("Lantern", "Harbor", "Orchard", "Compass", "Tide", "Garden", "Archive", "Bridge", "Mirror",
          "Meridian", "Lighthouse", "Clockwork", "Voyage", "Ember", "Canyon", "Chronicle", "Atlas", "Well")
_ORG_KINDS = ("Institute", "Shipping Company", "Observatory", "Trading House", "Conservatory", "Foundry",
              "Cartographic Society", "Savings Bank", "Botanical Trust", "Railway Company")
_CITY_FORMS = ("{c}", "Port {c}", "{c}ford", "{c} Falls", "New {c}", "{c}holm", "Upper {c}")
_COUNTRY_FORMS = ("{c}ia", "{c}land", "{c}ara", "{c}istan", "{c}onia")
_FILLER = {
    "person": ("{s} is remembered by colleagues for {a_adj} sense of humor.",
               "In later years {s} collected old maps and {nouns}.",
               "{s} rarely gave interviews and preferred long walks along the river.",
               "Friends describe {s} as patient, meticulous and fond of {adj} music."),
    "org": ("{s} employs several hundred people across three departments.",
            "The emblem of {s} shows {a_adj} {noun}.",
            "{s} publishes an annual report that few people read.",
            "Visitors can tour parts of {s} on the first Sunday of each month."),
    "city": ("{s} is known for its {adj} {noun} and narrow streets.",
             "A weekly market is held in the old square of {s}.",
             "{s} sits on a plateau and has mild summers.",
             "The main station of {s} was rebuilt after a flood."),
    "country": ("{s} has a long coastline and many small islands.",
                "The flag of {s} features {a_adj} {noun}.",
                "{s} is famous for its mountain railways.",
                "Tourism in {s} peaks in late spring."),
    "book": ("Critics praised {s} for its {adj} prose.",
             "{s} was translated into several languages.",
             "The cover of {s} shows {a_adj} {noun}.",
             "{s} is often taught in literature courses."),
    "film": ("{s} was shot mostly at night.",
             "The score of {s} uses only string instruments.",
             "{s} opens with a long shot of {a_adj} {noun}.",
             "{s} won a minor award at a regional festival."),
}


@dataclasses.dataclass(frozen=True)
class Relation:
    """A bridge or attribute relation: subject type -> object type, with its English renderings."""

    name: str
    subject_type: str
    object_type: str
    fact: str
    """Sentence stating the fact, with {s} (subject) and {o} (object)."""
    noun_phrase: str | None
    """Noun phrase for the object given the subject NP {s} (None for attribute relations)."""
    question: str
    """Question asking for the object when this relation is the last hop ({s} = subject NP)."""


RELATIONS: dict[str, Relation] = {r.name: r for r in (
    Relation("author", "book", "person", "{s} is a novel written by {o}.", "the author of {s}", "Who wrote {s}?"),
    Relation("director", "film", "person", "{s} is a film directed by {o}.", "the director of {s}",
             "Who directed {s}?"),
    Relation("birthplace", "person", "city", "{s} was born in the city of {o}.", "the city where {s} was born",
             "In which city was {s} born?"),
    Relation("employer", "person", "org", "{s} works for the {o}.", "the organization that employs {s}",
             "Which organization employs {s}?"),
    Relation("spouse", "person", "person", "{s} is married to {o}.", "the spouse of {s}",
             "Who is the spouse of {s}?"),
    Relation("headquarters", "org", "city", "The {s} is headquartered in {o}.",
             "the city where {s} is headquartered", "In which city is {s} headquartered?"),
    Relation("founder", "org", "person", "The {s} was founded by {o}.", "the founder of {s}", "Who founded {s}?"),
    Relation("country", "city", "country", "{s} is a city in {o}.", "the country in which {s} lies",
             "In which country is {s}?"),
    Relation("mayor", "city", "person", "The mayor of {s} is {o}.", "the mayor of {s}", "Who is the mayor of {s}?"),
    Relation("capital", "country", "city", "The capital of {s} is {o}.", "the capital of {s}",
             "What is the capital of {s}?"),
    Relation("birth_year", "person", "year", "{s} was born in the year {o}.", None, "In what year was {s} born?"),
    Relation("founding_year", "org", "year", "The {s} was founded in the year {o}.", None,
             "In what year was {s} founded?"),
    Relation("population", "city", "number", "{s} has a population of {o}.", None, "What is the population of {s}?"),
    Relation("currency", "country", "currency", "The currency of {s} is the {o}.", None,
             "What is the currency of {s}?"),
    Relation("language", "country", "language", "The official language of {s} is {o}.", None,
             "What is the official language of {s}?"),
    Relation("publication_year", "book", "year", "{s} was first published in the year {o}.", None,
             "In what year was {s} first published?"),
    Relation("release_year", "film", "year", "{s} was released in the year {o}.", None,
             "In what year was {s} released?"),
)}
# inverse or degenerate consecutive hops (capital -> country returns to the same country)
_FORBIDDEN_FOLLOWS = {("capital", "country"), ("spouse", "spouse")}
# a side fact through these would contradict the hop that led to the entity (the capital of A is
# "a city in B"; X's spouse "is married to" someone else)
_IMPLIED_BY_INCOMING = {"capital": "country", "spouse": "spouse"}
_ENTITY_TYPES = ("person", "org", "city", "country", "book", "film")
# types named with "the" in running text ("works for the X Institute"); NPs add it themselves
_ARTICLE_TYPES = ("org",)


def entity_namespace_of(core: str) -> str:
    """The namespace ("train" or "eval") that owns names built on this core word."""
    return NAMESPACES[hashlib.sha256(core.lower().encode()).digest()[0] % 2]


@dataclasses.dataclass(frozen=True)
class _Entity:
    type: str
    name: str
    core: str
    aliases: tuple[str, ...] = ()


class _Namer:
    """Draws fresh fictional names in one namespace; a name is never drawn twice."""

    def __init__(self, rng: random.Random, namespace: str) -> None:
        self.rng = rng
        self.namespace = namespace
        self.used_cores: set[str] = set()
        self.used_names: set[str] = set()

    def _syllable(self) -> str:
        return self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)

    def core(self) -> str:
        while True:
            word = "".join(self._syllable() for _ in range(self.rng.choice((2, 2, 3)))).capitalize()
            if 4 <= len(word) <= 8 and self._accept(word):
                return word

    def variant_core(self, core: str) -> str:
        """A near-identical core (one syllable-ish change) in the same namespace: a hard distractor."""
        for _ in range(200):
            cut = self.rng.randrange(max(1, len(core) - 2), len(core) + 1)
            word = (core[:cut] + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS))[: len(core) + 1].capitalize()
            if word.lower() != core.lower() and self._accept(word):
                return word
        return self.core()

    def _accept(self, core: str) -> bool:
        if core.lower() in self.used_cores or entity_namespace_of(core) != self.namespace:
            return False
        self.used_cores.add(core.lower())
        return True

    def entity(self, kind: str, core: str | None = None, avoid_initial: str | None = None) -> _Entity:
        core = core or self.core()
        rng = self.rng
        if kind == "person":
            first = rng.choice([f for f in _FIRST_NAMES if f[0] != avoid_initial])
            name = f"{first} {core}"
            return _Entity(kind, name, core, (f"{first[0]}. {core}",))
        if kind == "org":
            # no acronym alias: acronyms of different organizations collide across namespaces
            return _Entity(kind, f"{core} {rng.choice(_ORG_KINDS)}", core)
        if kind == "city":
            return _Entity(kind, rng.choice(_CITY_FORMS).format(c=core), core)
        if kind == "country":
            name = rng.choice(_COUNTRY_FORMS).format(c=core)
            return _Entity(kind, name, core, (f"Republic of {name}",))
        if kind == "book":
            return _Entity(kind, f"The {rng.choice(_NOUNS)} of {core}", core)
        if kind == "film":
            form = rng.choice(("Night over {c}", "{c} Rising", "The {c} Affair", "Beyond {c}"))
            return _Entity(kind, form.format(c=core), core)
        raise ValueError(f"unknown entity type {kind!r}")


def _attribute_value(kind: str, rng: random.Random, namer: _Namer) -> tuple[str, tuple[str, ...]]:
    """A fresh value (and aliases) for an attribute relation's object type."""
    if kind == "year":
        return str(rng.randrange(1801, 2000)), ()
    if kind == "number":
        return f"{rng.randrange(12, 990) * 100:,}", ()
    if kind == "currency":
        core = namer.core()
        return core.lower(), (core.lower() + "s",)
    if kind == "language":
        core = namer.core()
        return core + rng.choice(("ish", "ese", "ic")), ()
    raise ValueError(f"unknown attribute type {kind!r}")


def _np(entity_name: str, entity_type: str) -> str:
    return f"the {entity_name}" if entity_type in _ARTICLE_TYPES else entity_name


def _walk_relations(rng: random.Random, num_hops: int) -> list[Relation]:
    """A random chain of relations whose types compose; the last one gives the answer."""
    while True:
        subject_type = rng.choice(_ENTITY_TYPES)
        chain: list[Relation] = []
        for hop in range(num_hops):
            last = hop == num_hops - 1
            options = [r for r in RELATIONS.values() if r.subject_type == subject_type
                       and (last or r.noun_phrase is not None)
                       and (not chain or (chain[-1].name, r.name) not in _FORBIDDEN_FOLLOWS)]
            if not options:
                break
            rel = rng.choice(sorted(options, key=lambda r: r.name))
            chain.append(rel)
            subject_type = rel.object_type
        if len(chain) == num_hops:
            return chain


def _fact(rel: Relation, subject: str, obj: str) -> str:
    return rel.fact.format(s=subject, o=obj)


def _filler(rng: random.Random, kind: str, name: str, count: int) -> list[str]:
    templates = rng.sample(_FILLER[kind], k=min(count, len(_FILLER[kind])))
    subject = _np(name, kind)
    out = []
    for template in templates:
        adj, noun = rng.choice(_ADJECTIVES).lower(), rng.choice(_NOUNS).lower()
        a_adj = f"{'an' if adj[0] in 'aeiou' else 'a'} {adj}"
        nouns = noun + ("es" if noun.endswith(("s", "h")) else "s")
        out.append(template.format(s=subject, adj=adj, a_adj=a_adj, noun=noun, nouns=nouns))
    return [s[0].upper() + s[1:] for s in out]


def _side_fact(rng: random.Random, namer: _Namer, entity: _Entity, exclude: set[str]) -> str | None:
    """A true fact about `entity` through a relation the question does not use (harder reading)."""
    options = sorted((r for r in RELATIONS.values() if r.subject_type == entity.type and r.name not in exclude),
                     key=lambda r: r.name)
    if not options:
        return None
    rel = rng.choice(options)
    obj = _object_text(rel, rng, namer)
    return _fact(rel, entity.name, obj)


def _object_text(rel: Relation, rng: random.Random, namer: _Namer) -> str:
    if rel.object_type in _ENTITY_TYPES:
        return namer.entity(rel.object_type).name
    return _attribute_value(rel.object_type, rng, namer)[0]


def _document(rng: random.Random, entity: _Entity, facts: list[str], filler_sentences: int) -> Document:
    sentences = list(facts) + _filler(rng, entity.type, entity.name, filler_sentences)
    first, rest = sentences[0], sentences[1:]
    rng.shuffle(rest)
    if entity.aliases and entity.type in ("person", "org", "country"):
        first = f"{first} ({entity.name} is also known as {entity.aliases[0]}.)"
    return Document(title=entity.name, text=" ".join([first, *rest]))


def _one_item(rng: random.Random, namer: _Namer, item_id: str, num_hops: int, num_distractors: int,
              filler_range: tuple[int, int]) -> QAItem:
    chain = _walk_relations(rng, num_hops)
    subject = namer.entity(chain[0].subject_type)
    anchor = subject
    noun_phrase = _np(subject.name, subject.type)
    hops, supporting, hard = [], [], []
    incoming: str | None = None
    for i, rel in enumerate(chain):
        last = i == len(chain) - 1
        if rel.object_type in _ENTITY_TYPES:
            obj = namer.entity(rel.object_type)
            obj_name, obj_aliases = obj.name, obj.aliases
        else:
            obj, (obj_name, obj_aliases) = None, _attribute_value(rel.object_type, rng, namer)
        fact = _fact(rel, subject.name, obj_name)
        exclude = {rel.name, *(r.name for r in chain), _IMPLIED_BY_INCOMING.get(incoming, "")}
        side = _side_fact(rng, namer, subject, exclude=exclude)
        filler = rng.randint(*filler_range)
        supporting.append(_document(rng, subject, [fact] + ([side] if side else []), filler))
        hops.append({"subject": subject.name, "relation": rel.name, "object": obj_name, "fact": fact})
        hard.append(_hard_distractor(rng, namer, subject, rel, filler_range))
        if last:
            question = rel.question.format(s=noun_phrase)
            answers = [obj_name, *obj_aliases]
            if obj is not None:  # a similar-named decoy of the answer entity too
                hard.append(_hard_distractor(rng, namer, obj, None, filler_range))
        else:
            noun_phrase = rel.noun_phrase.format(s=noun_phrase)
            subject, incoming = obj, rel.name
    distractors = hard[:num_distractors]
    while len(distractors) < num_distractors:
        distractors.append(_random_document(rng, namer, filler_range))
    rng.shuffle(distractors)
    question = question[0].upper() + question[1:]
    meta = {"source": "synthetic", "num_hops": num_hops, "anchor": anchor.name, "hops": hops,
            "namespace": namer.namespace}
    return QAItem(item_id, question, answers, supporting, distractors, meta)


def _hard_distractor(rng: random.Random, namer: _Namer, entity: _Entity, rel: Relation | None,
                     filler_range: tuple[int, int]) -> Document:
    """A document about a near-namesake of `entity` stating `rel` (or another relation) differently."""
    avoid = entity.name[0] if entity.type == "person" else None
    decoy = namer.entity(entity.type, core=namer.variant_core(entity.core), avoid_initial=avoid)
    options = [rel] if rel is not None else sorted(
        (r for r in RELATIONS.values() if r.subject_type == entity.type), key=lambda r: r.name)
    chosen = rng.choice(options)
    return _document(rng, decoy, [_fact(chosen, decoy.name, _object_text(chosen, rng, namer))],
                     rng.randint(*filler_range))


def _random_document(rng: random.Random, namer: _Namer, filler_range: tuple[int, int]) -> Document:
    entity = namer.entity(rng.choice(_ENTITY_TYPES))
    options = sorted((r for r in RELATIONS.values() if r.subject_type == entity.type), key=lambda r: r.name)
    relations = rng.sample(options, k=min(2, len(options)))
    facts = [_fact(rel, entity.name, _object_text(rel, rng, namer)) for rel in relations]
    return _document(rng, entity, facts, rng.randint(*filler_range))


def generate_synthetic_qa(num_samples: int, seed: int, num_hops: tuple[int, int] = (2, 4),
                          entity_namespace: str = "train", num_distractors: int = 12,
                          filler_sentences: tuple[int, int] = (2, 4), id_prefix: str | None = None) -> list[QAItem]:
    """Generates `num_samples` reproducible multi-hop QA items with fictional entities.

    Args:
        num_samples: number of items.
        seed: same seed (and arguments) -> identical items, on any machine.
        num_hops: inclusive (min, max) number of bridge facts per question; each item draws one.
        entity_namespace: "train" or "eval"; the two namespaces share no entity name or alias, so an
            eval set built with "eval" is held out from any training set built with "train".
        num_distractors: the item's own distractor documents (near-namesake decoys first, then
            documents about unrelated fictional entities).
        filler_sentences: inclusive (min, max) descriptive sentences added to each document.
        id_prefix: item ids are f"{id_prefix}-{index:06d}" (default "syn-{namespace}-{seed}").
    """
    if entity_namespace not in NAMESPACES:
        raise ValueError(f"entity_namespace={entity_namespace!r} is not one of {', '.join(NAMESPACES)}")
    low, high = num_hops
    if not 1 <= low <= high:
        raise ValueError(f"num_hops={num_hops!r} must be (min, max) with 1 <= min <= max")
    if num_samples < 0 or num_distractors < 0:
        raise ValueError("num_samples and num_distractors must be >= 0")
    if not 0 <= filler_sentences[0] <= filler_sentences[1]:
        raise ValueError(f"filler_sentences={filler_sentences!r} must be (min, max) with 0 <= min <= max")
    rng = random.Random(f"solopo-synthetic-{seed}-{entity_namespace}")
    namer = _Namer(rng, entity_namespace)
    prefix = id_prefix or f"syn-{entity_namespace}-{seed}"
    return [_one_item(rng, namer, f"{prefix}-{i:06d}", rng.randint(low, high), num_distractors,
                      tuple(filler_sentences))
            for i in range(num_samples)]


# ------------------------------------------------------------------------------- scripted responses
def _reasoning(hops: Sequence[dict]) -> str:
    return " ".join(hop["fact"] for hop in hops)


def _wrong_value(kind: str, answers: Sequence[str], rng: random.Random) -> str:
    while True:
        if kind == "year":
            wrong = str(rng.randrange(1801, 2000))
        elif kind == "number":
            wrong = f"{rng.randrange(12, 990) * 100:,}"
        else:
            wrong = f"{rng.choice(_FIRST_NAMES)} {rng.choice(_NOUNS)}"
        if wrong not in answers:
            return wrong


def scripted_responses(item: QAItem, num_responses: int, rng: random.Random,
                       correct_probability: float | None = None) -> list[str]:
    """Chain-of-thought responses written from the item's bridge facts, some right and some wrong.

    For pipeline tests and the demo without a model (not for real training). Wrong responses either
    follow a wrong value at the last hop, stop at a bridge entity, or refuse ("not mentioned").
    `correct_probability` defaults to a per-item draw in [0, 1], so some items come out all-correct or
    all-wrong and are dropped, as with a real model.
    """
    hops = item.meta.get("hops")
    if not hops:
        raise ValueError(f"item {item.id!r} has no meta['hops']: scripted responses need synthetic items "
                         "(data.source=synthetic); use the hf or vllm backend for other sources")
    p_correct = rng.random() if correct_probability is None else correct_probability
    responses = []
    for _ in range(num_responses):
        if rng.random() < p_correct:
            answer = rng.choice(item.answers)
            responses.append(f"{_reasoning(hops)} So the answer is {answer}.\nAnswer: {answer}")
            continue
        kind = rng.choice(("wrong_value", "bridge", "refuse"))
        if kind == "bridge" and len(hops) > 1:
            cut = rng.randrange(1, len(hops))
            responses.append(f"{_reasoning(hops[:cut])}\nAnswer: {hops[cut - 1]['object']}")
        elif kind == "refuse":
            responses.append("The documents do not state this information.\nAnswer: not mentioned")
        else:
            wrong = _wrong_value(RELATIONS[hops[-1]["relation"]].object_type, item.answers, rng)
            responses.append(f"{_reasoning(hops[:-1])} The documents suggest {wrong}.\nAnswer: {wrong}")
    return responses
