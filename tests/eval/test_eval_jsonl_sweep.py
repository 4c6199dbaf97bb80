"""The jsonl suite with eval.jsonl_layout=sweep: a user's own QA rows (examples/eval/my_qa.jsonl) at two
lengths and three depths, evidence placed as the synthetic suites place it, lengths on target, rows that
carry their own context kept as given, the other rows' documents as the default pool, and the config checks."""

import json
import pathlib
import re

import pytest

from megatron_solopo.data.contexts import ContextTemplates, TokenCounter
from megatron_solopo.eval.config import EvalConfig
from megatron_solopo.eval.suites import build_suites

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples" / "eval"
QA = EXAMPLES / "my_qa.jsonl"
POOL = EXAMPLES / "distractor_pool.jsonl"
LENGTHS = [384, 768]
DEPTHS = [0.0, 0.5, 1.0]


def _rows():
    return [json.loads(line) for line in QA.read_text().splitlines() if line.strip()]


def _doc_text(doc):
    return doc if isinstance(doc, str) else doc["text"]


def _sweep_config(**overrides):
    fields = {"suites": ["jsonl"], "jsonl_paths": [str(QA)], "jsonl_layout": "sweep",
              "jsonl_distractor_pool_path": str(POOL), "context_lengths": LENGTHS, "depths": DEPTHS}
    return EvalConfig(**{**fields, **overrides})


def _evidence_depth(prompt: str, evidence: list[str], counter: TokenCounter) -> tuple[float, float, int]:
    """(measured depth, one document's share, index of the first evidence document) from the rendered
    prompt: distractor tokens before the evidence block / all distractor tokens (data.contexts' depth)."""
    templates = ContextTemplates()
    head, tail = templates.prompt.split("{documents}")
    documents = prompt[len(head.split("{question}")[0]):prompt.index("\n\nQuestion: ")]
    docs = documents.split(templates.separator)
    is_evidence = [any(text in doc for text in evidence) for doc in docs]
    first = is_evidence.index(True)
    block = len(evidence)
    assert is_evidence[first:first + block] == [True] * block and sum(is_evidence) == block  # one contiguous block
    costs = [counter(doc) for doc in docs]
    distractor = [c for c, ev in zip(costs, is_evidence) if not ev]
    total = sum(distractor)
    return sum(costs[:first]) / total, max(distractor) / total, first


def test_user_rows_swept_over_two_lengths_and_three_depths(tiny_tokenizer):
    counter = TokenCounter(tiny_tokenizer)
    config = _sweep_config()
    built = build_suites(config, tiny_tokenizer)
    assert built.skipped == {"jsonl": {}}
    rows = _rows()
    swept = [r for r in rows if not r.get("as_given")]
    items = {(i.source_id, i.context_length, i.depth): i for i in built.items if i.meta["layout"] == "sweep"}
    assert set(items) == {(r["id"], length, depth) for r in swept for length in LENGTHS for depth in DEPTHS}
    for row in swept:
        evidence = [_doc_text(d) for d in row["supporting_docs"]]
        for length in LENGTHS:
            measured = []
            for depth in DEPTHS:
                item = items[(row["id"], length, depth)]
                # the length: measured on the user prompt, within eval.length_tolerance of the target
                assert item.prompt_tokens == counter(item.prompt)
                assert abs(item.prompt_tokens - length) <= config.length_tolerance * length
                # the evidence: one block at the configured depth (to within one document's share)
                got, one_doc, first = _evidence_depth(item.prompt, evidence, counter)
                assert abs(got - depth) <= one_doc + 0.02, (row["id"], length, depth, got)
                assert min(item.meta["evidence_positions"]) == first
                measured.append(got)
                # the row's own distractors are used before the pool (the last one may be cut short)
                for own in row.get("distractor_docs", []):
                    assert f"(Title: {own['title']}) " in item.prompt
                assert item.question == row["question"] and item.answers == row["answers"]
            assert measured[0] == 0.0 and measured[-1] == 1.0 and measured == sorted(measured)
            # the depth 0 prompt opens with the evidence; at depth 1 it sits right before the question
            first = items[(row["id"], length, 0.0)].prompt
            assert any(first.split("Document [1] ", 1)[1].split("\n\n")[0].endswith(e) for e in evidence)
            last = items[(row["id"], length, 1.0)].prompt.split("\n\nQuestion: ")[0]
            assert any(last.endswith(e) for e in evidence)


def test_rows_with_their_own_context_stay_as_given(tiny_tokenizer):
    built = build_suites(_sweep_config(), tiny_tokenizer)
    given = [i for i in built.items if i.meta["layout"] == "as_given"]
    row = next(r for r in _rows() if r.get("as_given"))
    assert [(i.source_id, i.depth, i.context_length) for i in given] == [(row["id"], None, LENGTHS[0])]
    assert _doc_text(row["supporting_docs"][0]) in given[0].prompt
    assert "Document [2]" not in given[0].prompt  # no filler added


def test_same_distractors_at_every_depth_and_reproducible(tiny_tokenizer):
    first = build_suites(_sweep_config(), tiny_tokenizer).items
    again = build_suites(_sweep_config(), tiny_tokenizer).items
    assert [i.prompt for i in first] == [i.prompt for i in again]
    by_cell = {(i.source_id, i.context_length, i.depth): i.prompt for i in first}
    for length in LENGTHS:
        docs = [{re.sub(r"^Document \[\d+\] ", "", doc) for doc in by_cell[("museum-1", length, d)].split("\n\n")}
                for d in DEPTHS]  # documents without their position number
        # the distractors (whole ones; the last may be cut at another word) are the same at every depth
        assert len(docs[0] & docs[1] & docs[2]) >= len(docs[0]) - 3


def test_default_pool_is_the_other_rows_documents(tiny_tokenizer):
    config = _sweep_config(jsonl_distractor_pool_path=None, context_lengths=[384], depths=[0.0, 1.0])
    built = build_suites(config, tiny_tokenizer)
    museum3 = [i for i in built.items if i.source_id == "museum-3"]
    assert len(museum3) == 2  # a row without distractor_docs: all its filler comes from the other rows
    row_texts = [_doc_text(d) for r in _rows() for d in r["supporting_docs"] + r.get("distractor_docs", [])]
    for item in museum3:
        documents = item.prompt.split("documents below.\n\n", 1)[1].split("\n\nQuestion: ")[0].split("\n\n")
        assert len(documents) >= 3
        for doc in documents:  # every document is a row's document (the last filler may be cut short)
            body = doc.split(") ", 1)[1]
            assert any(text.startswith(body) for text in row_texts), body
    # too long for the rows' own text: skipped and counted, never truncated
    long = build_suites(_sweep_config(jsonl_distractor_pool_path=None, context_lengths=[4096]), tiny_tokenizer)
    assert sum(long.skipped["jsonl"].values()) == 4 * len(DEPTHS) and "not_enough_distractors" in long.skipped["jsonl"]
    assert [i.meta["layout"] for i in long.items] == ["as_given"]


def test_as_given_layout_is_unchanged(tiny_tokenizer):
    config = EvalConfig(suites=["jsonl"], jsonl_paths=[str(QA)], context_lengths=LENGTHS)
    items = build_suites(config, tiny_tokenizer).items
    assert [i.source_id for i in items] == [r["id"] for r in _rows()]
    assert all(i.depth is None and i.meta["layout"] == "as_given" for i in items)


@pytest.mark.parametrize("fields, message", [
    ({"jsonl_layout": "depth"}, "jsonl_layout='depth' is not one of"),
    ({"jsonl_layout": "as_given", "jsonl_distractor_pool_path": "pool.jsonl"}, "only fills contexts with"),
    ({"suites": ["multihop"], "jsonl_paths": [], "jsonl_distractor_pool_path": None}, "jsonl suite is not in"),
])
def test_config_checks(fields, message):
    with pytest.raises(ValueError, match=message):
        _sweep_config(**fields)


def test_bad_as_given_flag_names_the_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "Q?", "answer": "A", "supporting_docs": ["A."], "as_given": "yes"}) + "\n")
    with pytest.raises(TypeError, match=r"qa.jsonl:1: field 'as_given' must be true or false"):
        build_suites(_sweep_config(jsonl_paths=[str(path)]), tiny_tokenizer)


def test_example_config_sweeps_two_lengths_and_three_depths(tiny_tokenizer, monkeypatch):
    from megatron_solopo.config import load_config

    monkeypatch.chdir(EXAMPLES.parents[1])  # the example's paths are relative to the project root
    config = load_config(EXAMPLES / "my_qa_sweep.yaml").eval
    built = build_suites(config, tiny_tokenizer)
    cells = {(i.context_length, i.depth) for i in built.items if i.depth is not None}
    assert len(config.context_lengths) == 2 and len(config.depths) == 3
    assert cells == {(length, depth) for length in config.context_lengths for depth in config.depths}
    assert len(built.items) == 4 * 2 * 3 + 1 and built.skipped == {"jsonl": {}}


def test_the_same_file_elsewhere_gives_the_same_prompts(tiny_tokenizer, tmp_path):
    """The layout seed must not depend on where the file lives (a fresh clone in another directory once
    rendered other distractor orders than the developer's checkout)."""
    moved = tmp_path / "elsewhere" / QA.name
    moved.parent.mkdir()
    moved.write_text(QA.read_text())
    here = build_suites(_sweep_config(), tiny_tokenizer).items
    there = build_suites(_sweep_config(jsonl_paths=[str(moved)]), tiny_tokenizer).items
    assert [i.prompt for i in here] == [i.prompt for i in there] and here
