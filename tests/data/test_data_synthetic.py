"""The synthetic generator: reproducible, answers derivable from the evidence only, disjoint namespaces."""

import dataclasses
import random
import re

import pytest

from megatron_solopo.data.scoring import score_response
from megatron_solopo.data.synthetic import generate_synthetic_qa, scripted_responses

# Hand-written readers of each bridge fact, independent of the generator's templates: the test parses
# the documents' text with these and follows the chain itself.
FACT_PATTERNS = {
    "author": r"{s} is a novel written by ([^.]+)\.",
    "director": r"{s} is a film directed by ([^.]+)\.",
    "birthplace": r"{s} was born in the city of ([^.]+)\.",
    "employer": r"{s} works for the ([^.]+)\.",
    "spouse": r"{s} is married to ([^.]+)\.",
    "headquarters": r"The {s} is headquartered in ([^.]+)\.",
    "founder": r"The {s} was founded by ([^.]+)\.",
    "country": r"{s} is a city in ([^.]+)\.",
    "mayor": r"The mayor of {s} is ([^.]+)\.",
    "capital": r"The capital of {s} is ([^.]+)\.",
    "birth_year": r"{s} was born in the year (\d{{4}})\.",
    "founding_year": r"The {s} was founded in the year (\d{{4}})\.",
    "population": r"{s} has a population of ([\d,]+)\.",
    "currency": r"The currency of {s} is the (\w+)\.",
    "language": r"The official language of {s} is (\w+)\.",
    "publication_year": r"{s} was first published in the year (\d{{4}})\.",
    "release_year": r"{s} was released in the year (\d{{4}})\.",
}


def _objects(relation, subject, texts):
    pattern = re.compile(FACT_PATTERNS[relation].format(s=re.escape(subject)))
    # whole-name matches only ("Kessa" must not match inside "Vankessa"); checked by hand because a
    # look-behind defeats the regex engine's literal-prefix search (100x slower here)
    return [m.group(1) for text in texts for m in pattern.finditer(text)
            if m.start() == 0 or not text[m.start() - 1].isalnum()]


def _mentions(name, text):
    start = text.find(name)
    while start != -1:
        end = start + len(name)
        if (start == 0 or not text[start - 1].isalnum()) and (end == len(text) or not text[end].isalnum()):
            return True
        start = text.find(name, start + 1)
    return False


def test_same_seed_same_items_and_different_seed_different_items():
    a = generate_synthetic_qa(12, seed=3)
    b = generate_synthetic_qa(12, seed=3)
    c = generate_synthetic_qa(12, seed=4)
    assert [dataclasses.asdict(x) for x in a] == [dataclasses.asdict(x) for x in b]
    assert [x.question for x in a] != [x.question for x in c]
    # a prefix of a longer run is the same: item i does not depend on how many follow
    assert [dataclasses.asdict(x) for x in generate_synthetic_qa(5, seed=3)] == [dataclasses.asdict(x) for x in a[:5]]


def test_hop_counts_and_shapes():
    items = generate_synthetic_qa(60, seed=1, num_hops=(2, 4), num_distractors=9)
    hops = {item.meta["num_hops"] for item in items}
    assert hops == {2, 3, 4}
    for item in items:
        assert len(item.supporting_docs) == item.meta["num_hops"] == len(item.meta["hops"])
        assert len(item.distractor_docs) == 9
        assert len({item.id for item in items}) == len(items)
    assert {i.meta["num_hops"] for i in generate_synthetic_qa(10, seed=1, num_hops=(3, 3))} == {3}


def test_answers_are_derivable_from_the_evidence_only():
    items = generate_synthetic_qa(80, seed=11)
    # one string (documents never contain newlines), so each check is a single regex scan
    pool_texts = ["\n".join(d.text for item in items for d in item.distractor_docs)]
    for item in items:
        evidence = [d.text for d in item.supporting_docs]
        anchor = item.meta["anchor"]
        assert _mentions(anchor, item.question), (item.question, anchor)
        subject = anchor
        for hop in item.meta["hops"]:
            found = _objects(hop["relation"], subject, evidence)
            assert len(found) == 1, (item.id, hop, found)  # stated once, unambiguously
            # no distractor (own or any other item's) states this fact about the chain entity
            assert _objects(hop["relation"], subject, pool_texts) == [], (item.id, hop)
            subject = found[0]
        assert subject == item.answers[0], (item.question, subject, item.answers)
        assert any(item.answers[0] in text for text in evidence)
        assert item.answers[0] not in item.question
        # chain entities are named nowhere outside the evidence
        for hop in item.meta["hops"]:
            assert not any(_mentions(hop["subject"], t) for t in pool_texts)


def test_hard_distractors_have_near_namesakes():
    items = generate_synthetic_qa(20, seed=5)
    close = 0
    for item in items:
        titles = [d.title for d in item.distractor_docs]
        for hop in item.meta["hops"]:
            core = hop["subject"].split()[-1] if " " in hop["subject"] else hop["subject"]
            close += any(t != hop["subject"] and core[:3] in t for t in titles)
    assert close >= 0.8 * sum(len(i.meta["hops"]) for i in items)


def test_train_and_eval_namespaces_share_no_entity():
    def names(namespace):
        out = set()
        for item in generate_synthetic_qa(150, seed=0, entity_namespace=namespace):
            out.update(d.title for d in item.supporting_docs + item.distractor_docs)
            out.update(a for a in item.answers if not a.replace(",", "").isdigit())
        return out

    train, evaluation = names("train"), names("eval")
    assert len(train) > 1000 and len(evaluation) > 1000
    assert train.isdisjoint(evaluation)
    # also with different seeds per namespace (held-out eval sets are usually generated separately)
    other = set()
    for item in generate_synthetic_qa(150, seed=99, entity_namespace="eval"):
        other.update(d.title for d in item.supporting_docs)
    assert train.isdisjoint(other)


def test_generator_argument_errors():
    with pytest.raises(ValueError, match="entity_namespace"):
        generate_synthetic_qa(1, 0, entity_namespace="test")
    with pytest.raises(ValueError, match="num_hops"):
        generate_synthetic_qa(1, 0, num_hops=(3, 2))


def test_scripted_responses_score_as_intended():
    item = generate_synthetic_qa(1, seed=2)[0]
    right = scripted_responses(item, 8, random.Random(0), correct_probability=1.0)
    wrong = scripted_responses(item, 8, random.Random(0), correct_probability=0.0)
    assert all(score_response(r, item.answers).sub_em == 1.0 for r in right)
    assert all(score_response(r, item.answers).sub_em == 0.0 for r in wrong)
