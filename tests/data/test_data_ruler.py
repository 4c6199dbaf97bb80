"""RULER-style tasks (data.ruler): determinism, what the evidence says, where it lands, lengths, scoring,
the data source through the pipeline, and config errors. Expected values are derived from the generated
text itself (e.g. the variable chain is re-traced by parsing the documents), not copied from the code."""

import dataclasses
import random
import re

import pytest

from megatron_solopo.data.config import DataConfig
from megatron_solopo.data.contexts import TokenCounter, build_short_context, long_context_at_depth
from megatron_solopo.data.pairs import PairChoice, select_pair
from megatron_solopo.data.pipeline import build_data
from megatron_solopo.data.records import read_pair_records
from megatron_solopo.data.ruler import RULER_TASKS, RulerSpec, generate_ruler
from megatron_solopo.data.scoring import answer_scores, score_response
from megatron_solopo.data.sources import load_source

LENGTH = 1024
NEEDLE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking")


@pytest.fixture(scope="module")
def sources():
    return {task: generate_ruler(RulerSpec(task), 6, seed=11, namespace="eval", haystack_tokens=2 * LENGTH)
            for task in RULER_TASKS}


@pytest.fixture(scope="module")
def counter(data_tokenizer):
    return TokenCounter(data_tokenizer)


def _text(docs):
    return " ".join(d.text for d in docs)


# ------------------------------------------------------------------------------------------ generation
def test_same_seed_same_items_other_seed_other_items(sources):
    for task in RULER_TASKS:
        again = generate_ruler(RulerSpec(task), 6, seed=11, namespace="eval", haystack_tokens=2 * LENGTH)
        assert [dataclasses.asdict(i) for i in again.items] == [dataclasses.asdict(i) for i in sources[task].items]
        assert again.filler == sources[task].filler
        other = generate_ruler(RulerSpec(task), 6, seed=12, namespace="eval", haystack_tokens=2 * LENGTH)
        assert [i.question for i in other.items] != [i.question for i in sources[task].items]


def test_needles_answer_the_question_only_in_the_evidence(sources):
    magic = re.compile(r"The special magic number for ([\w-]+) is (\d{7})\.")
    for task in ("niah_single", "niah_multikey", "niah_multivalue"):
        for item in sources[task].items:
            key = re.search(r"magic numbers? for ([\w-]+)", item.question).group(1)
            evidence = magic.findall(_text(item.supporting_docs))
            assert {k for k, _ in evidence} == {key}
            assert sorted(v for _, v in evidence) == sorted(item.answers)
            others = magic.findall(_text(item.distractor_docs) + _text(sources[task].filler))
            assert key not in {k for k, _ in others}  # no other document names the asked key
            assert item.spread_distractors
    counts = {task: {len(i.answers) for i in sources[task].items} for task in ("niah_single", "niah_multivalue")}
    assert counts == {"niah_single": {1}, "niah_multivalue": {4}}
    assert {len(i.distractor_docs) for i in sources["niah_multikey"].items} == {3}  # RULER: 3 other keys
    assert {i.answer_match for i in sources["niah_multivalue"].items} == {"all"}
    assert {i.answer_match for i in sources["niah_multikey"].items} == {"any"}


def _trace(text: str, value: str) -> set[str]:
    """Variables holding `value`, by following the VAR statements of `text`."""
    direct = dict(re.findall(r"VAR ([A-Z]{5}) = (\d+)\.", text))
    copies = dict(re.findall(r"VAR ([A-Z]{5}) = VAR ([A-Z]{5})\.", text))
    holding = {name for name, v in direct.items() if v == value}
    while True:
        more = {name for name, source in copies.items() if source in holding} - holding
        if not more:
            return holding
        holding |= more


def test_variable_tracking_answers_are_the_traced_chain(sources):
    for item in sources["variable_tracking"].items:
        value = re.search(r"assigned the value (\d+)", item.question).group(1)
        everything = _text(item.supporting_docs) + " " + _text(item.distractor_docs)
        assert _trace(everything, value) == set(item.answers) == _trace(_text(item.supporting_docs), value)
        assert len(item.answers) == 5 and item.answer_match == "all"  # RULER: 4 hops -> 5 variables
        assert len(re.findall(r"VAR [A-Z]{5} =", _text(item.distractor_docs))) == 5  # one other chain
        assert not set(item.answers) & set(re.findall(r"VAR ([A-Z]{5})", _text(item.distractor_docs)))


def test_qa_is_a_one_hop_fact_lookup_with_decoys(sources):
    for item in sources["qa"].items:
        assert len(item.supporting_docs) == 1 and len(item.distractor_docs) == 4
        assert any(a in item.supporting_docs[0].text for a in item.answers)
        assert not any(re.search(rf"\b{re.escape(a)}\b", _text(item.distractor_docs)) for a in item.answers)
        hop = item.meta["hops"][0]
        assert hop["subject"] not in _text(sources["qa"].filler)  # the filler never names the question's entity


# ------------------------------------------------------------------------------------------ contexts
def _needle_depth(text: str, needle_doc_text: str, tokenizer) -> float:
    """Tokens of documents before the needle's document / tokens of the other documents, on the prompt."""
    count = lambda s: len(tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
    docs_start = text.index("Document [1]")
    docs_end = text.index("\n\nQuestion:")
    needle_start = text.rindex("Document [", 0, text.index(needle_doc_text))
    needle_end = text.find("\n\nDocument [", needle_start + 1)
    needle_end = docs_end if needle_end == -1 else needle_end
    before = count(text[docs_start:needle_start])
    others = count(text[docs_start:docs_end]) - count(text[needle_start:needle_end])
    return before / others


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "qa"])
def test_long_context_puts_the_needle_at_the_depth_within_budget(sources, counter, data_tokenizer, task):
    source = sources[task]
    for item in source.items[:3]:
        for depth in (0.0, 0.5, 1.0):
            long = long_context_at_depth(item, counter, LENGTH, depth, seed=3, pool=source.filler)
            assert abs(long.num_tokens - LENGTH) <= 0.05 * LENGTH
            assert long.num_tokens == len(data_tokenizer.encode(long.text, add_special_tokens=False))
            measured = _needle_depth(long.text, item.supporting_docs[0].text, data_tokenizer)
            # one filler document is ~100 of the ~1000 tokens: the block lands within a document of the depth
            assert abs(measured - depth) <= 0.12, (item.id, depth, measured)
            for doc in item.distractor_docs:  # distractor needles / decoys are always in x_long
                assert doc.text in long.text
            short, short_tokens = build_short_context(item, counter, 10_000, random.Random(0))
            assert short_tokens < long.num_tokens / 3
            assert all(doc.text not in short for doc in item.distractor_docs)
            assert all(doc.text in short for doc in item.supporting_docs)


def test_distractor_needles_are_spread_through_the_filler(sources, counter):
    source = sources["niah_multikey"]
    positions = []
    for seed, item in enumerate(source.items):
        long = long_context_at_depth(item, counter, LENGTH, 0.5, seed=seed, pool=source.filler)
        starts = sorted(long.text.index(d.text) for d in source.filler if d.text in long.text)
        for doc in item.distractor_docs:
            at = long.text.index(doc.text)
            positions.append(sum(s < at for s in starts) / len(starts))
    # without spreading, the item's own distractors would all come first (position ~0)
    assert 0.25 < sum(positions) / len(positions) < 0.75
    assert max(positions) > 0.5


@pytest.mark.parametrize("task", ["niah_multivalue", "variable_tracking"])
def test_multi_needle_evidence_block_at_the_depth(sources, counter, task):
    source = sources[task]
    item = source.items[0]
    for depth in (0.0, 1.0):  # 5 + 5 VAR paragraphs of the tiny tokenizer take ~1200 tokens: 2K holds them all
        long = long_context_at_depth(item, counter, 2 * LENGTH, depth, seed=3, pool=source.filler)
        assert abs(long.num_tokens - 2 * LENGTH) <= 0.05 * 2 * LENGTH
        assert all(d.text in long.text for d in (*item.supporting_docs, *item.distractor_docs))
        positions = long.evidence_positions
        assert positions == list(range(positions[0], positions[0] + len(item.supporting_docs)))  # one block
        assert positions[0] == 0 if depth == 0.0 else positions[-1] == long.num_documents - 1


# ------------------------------------------------------------------------------------------ scoring
def test_all_values_scoring_rule():
    golds = ["4821937", "1130562", "7765309", "2290418"]
    full = answer_scores("4821937, 1130562, 7765309 and 2290418", golds, "all")
    assert full == {"sub_em": 1.0, "em": 1.0, "f1": 1.0}
    shuffled = answer_scores("2290418; 7765309; 4821937; 1130562", golds, "all")
    assert shuffled["sub_em"] == shuffled["em"] == 1.0
    partial = answer_scores("4821937, 1130562", golds, "all")
    # 2 of 4 one-token values, nothing else: precision 1, recall 1/2 -> F1 2/3; all-or-nothing sub-EM
    assert partial == {"sub_em": 0.0, "em": 0.0, "f1": pytest.approx(2 / 3)}
    extra = answer_scores("4821937, 1130562, 7765309, 2290418, 5555555", golds, "all")
    assert extra["sub_em"] == 1.0 and extra["em"] == 0.0 and extra["f1"] == pytest.approx(2 * 0.8 / 1.8)
    assert answer_scores("9999999", golds, "all") == {"sub_em": 0.0, "em": 0.0, "f1": 0.0}
    assert answer_scores("48219370", ["4821937"], "all")["sub_em"] == 0.0  # word boundaries as for sub-EM
    # "any" keeps the paper's rule: one of gold/aliases suffices
    assert answer_scores("4821937", golds, "any")["sub_em"] == 1.0
    with pytest.raises(ValueError, match="answer_match='some'"):
        answer_scores("x", golds, "some")


def test_variable_names_scored_with_their_var_prefix():
    golds = ["QWERT", "ASDFG", "ZXCVB"]
    response = "VAR QWERT = 123, so QWERT, ASDFG copy it.\nAnswer: VAR QWERT, VAR ASDFG and VAR ZXCVB"
    score = score_response(response, golds, max_answer_words=12, answer_match="all")
    assert (score.sub_em, score.em) == (1.0, 1.0)
    assert score_response("Answer: QWERT, ASDFG", golds, answer_match="all").sub_em == 0.0


def test_pairs_need_every_value_for_chosen():
    golds = ["1111111", "2222222"]
    responses = ["Answer: 1111111", "Answer: 1111111 and 2222222", "Answer: 3333333", "Answer: 2222222"]
    choice = select_pair(responses, golds, random.Random(0), "random", answer_match="all")
    assert isinstance(choice, PairChoice)
    assert choice.chosen == "Answer: 1111111 and 2222222" and choice.num_correct == 1
    assert choice.rejected != choice.chosen
    any_choice = select_pair(responses, golds, random.Random(0), "random", answer_match="any")
    assert any_choice.num_correct == 3  # under "any", one value is enough


# ------------------------------------------------------------------------------------------ source + pipeline
class _AnswerBackend:
    """Per question: the complete answer, half of it, and a wrong number (every item makes a pair)."""

    def requests_per_call(self, settings):
        return 64

    def generate(self, requests, settings, seed):
        out = []
        for request in requests:
            answers = request.item.answers
            half = answers[: max(1, len(answers) // 2)] if len(answers) > 1 else ["0000000"]
            out.append([f"Found it.\nAnswer: {', '.join(answers)}", f"Answer: {', '.join(half)}", "Answer: 42"])
        return out


def _ruler_config(tmp_path, **changes):
    base = dict(source="ruler", ruler_task="niah_multivalue", ruler_num_items=4, long_target_tokens=[1400],
                num_responses=3, sampling_backend="hf", max_new_tokens=16, output_dir=str(tmp_path / "out"),
                cache_dir=str(tmp_path / "cache"), evidence_position="depth", evidence_depths=[0.0, 0.5, 1.0])
    return DataConfig(**{**base, **changes})


def test_build_data_from_the_ruler_source(data_tokenizer, tmp_path):
    config = _ruler_config(tmp_path)
    source = load_source(config)
    assert len(source.items) == 4 and source.pool  # the generated filler is the pool
    assert load_source(_ruler_config(tmp_path, max_items=2)).items[0].question == source.items[0].question
    summary = build_data(config, data_tokenizer, _AnswerBackend(), "stub", progress=False)
    assert summary["counts"]["pairs_written"] == 4 and not summary["counts"]["context_skipped"]
    for record in read_pair_records(config.resolved_pairs_path):
        item = next(i for i in source.items if i.id == record["id"])
        assert record["chosen"].endswith(", ".join(item.answers))  # only the complete list is chosen
        assert record["meta"]["answer_match"] == "all" and record["meta"]["task"] == "niah_multivalue"
        assert all(doc.text in record["short_context"] for doc in item.supporting_docs)
        assert abs(record["meta"]["long_tokens"] - 1400) <= 70
        assert sum(d.text in record["long_context"] for d in source.pool) > 3  # filled with the filler


# ------------------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize("changes, message", [
    (dict(ruler_task="niah_single", ruler_num_values=3), r"data\.ruler_num_values is not used by the RULER task "
                                                         r"niah_single"),
    (dict(ruler_task="niah_multikey", ruler_num_distractors=0), r"data\.ruler_num_distractors must be >= 1"),
    (dict(ruler_task="niah_multivalue", ruler_num_values=1), r"data\.ruler_num_values must be an integer >= 2"),
    (dict(ruler_task="needle"), r"data\.ruler_task='needle' is not one of niah_single"),
    (dict(ruler_num_items=0), r"data\.ruler_num_items must be >= 1"),
    (dict(input_path="x.jsonl"), r"data\.input_path is set but data\.source=ruler does not read files"),
    (dict(synthetic_num_items=5), r"data\.synthetic_num_items is set but unused with data\.source=ruler"),
    (dict(ruler_task="variable_tracking", ruler_num_hops=12), r"data\.max_answer_words=12 is below the 13 values"),
])
def test_ruler_config_errors_name_the_setting(changes, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**{"source": "ruler", **changes})


def test_ruler_settings_need_the_ruler_source():
    with pytest.raises(ValueError, match=r"data\.ruler_task is set but unused with data\.source=synthetic"):
        DataConfig(source="synthetic", ruler_task="qa")
    assert DataConfig(source="ruler", ruler_task="variable_tracking", ruler_num_hops=12,
                      max_answer_words=None).ruler_spec.min_answer_words == 13
