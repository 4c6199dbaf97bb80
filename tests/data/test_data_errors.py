"""Bad input gets a clear error naming file:line (or row) and loses nothing; config validation."""

import json

import pytest

from megatron_solopo.data.config import DataConfig
from megatron_solopo.data.records import atomic_write, read_pair_records, write_jsonl
from megatron_solopo.data.sources import read_distractor_pool, read_generic, read_musique

GOOD_PAIR = {"id": "a", "question": "Q?", "answers": ["x"], "short_context": "short", "long_context": "a long one",
             "chosen": "Answer: x", "rejected": "Answer: y", "meta": {}}


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _pair(**changes):
    record = dict(GOOD_PAIR, **changes)
    return {k: v for k, v in record.items() if v is not _DROP}


_DROP = object()


@pytest.mark.parametrize("bad_row, error, message", [
    ('{"id": "b", "question": ', ValueError, r"pairs.jsonl:2: malformed JSON"),
    ("[1, 2]", TypeError, r"pairs.jsonl:2: expected a JSON object"),
    (_pair(id="b", chosen=_DROP), ValueError, r"pairs.jsonl:2: missing field 'chosen'"),
    (_pair(id="b", answers=[]), ValueError, r"pairs.jsonl:2: field 'answers' is empty"),
    (_pair(id="b", answers=[""]), ValueError, r"pairs.jsonl:2: answers\[0\] is an empty string"),
    (_pair(id="b", rejected="Answer: x"), ValueError, r"pairs.jsonl:2: chosen == rejected"),
    (_pair(id="b", answers="x"), TypeError, r"pairs.jsonl:2: field 'answers' must be a list"),
    (_pair(id="b", answers=[3]), TypeError, r"pairs.jsonl:2: answers\[0\] must be a string"),
    (_pair(id=7), TypeError, r"pairs.jsonl:2: field 'id' must be a string"),
    (_pair(id="b", meta=[]), TypeError, r"pairs.jsonl:2: field 'meta' must be an object"),
    (_pair(id="b", long_context=""), ValueError, r"pairs.jsonl:2: field 'long_context' is empty"),
    (_pair(id="a"), ValueError, r"pairs.jsonl:2: duplicate id 'a' \(first seen on line 1\)"),
    (dict(GOOD_PAIR, id="b", extra=1), ValueError, r"pairs.jsonl:2: unknown field\(s\) extra"),
])
def test_pair_file_errors_name_file_and_line(tmp_path, bad_row, error, message):
    path = _jsonl(tmp_path / "pairs.jsonl", [GOOD_PAIR, bad_row])
    with pytest.raises(error, match=message):
        read_pair_records(path)


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD_PAIR) + "\n\n" + '{"broken"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"pairs.jsonl:3: malformed JSON"):
        read_pair_records(path)
    assert len(read_pair_records(_jsonl(tmp_path / "ok.jsonl", [GOOD_PAIR, "", dict(GOOD_PAIR, id="b")]))) == 2


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_pair_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="no records"):
        read_pair_records(tmp_path / "empty.jsonl")


MUSIQUE = {"id": "2hop__1", "question": "When was the college that owns the paper founded?", "answer": "1960",
           "answer_aliases": ["in 1960"], "answerable": True,
           "paragraphs": [{"idx": 0, "title": "The Collegian", "paragraph_text": "The Collegian is owned by HBU.",
                           "is_supporting": True},
                          {"idx": 1, "title": "HBU", "paragraph_text": "HBU was founded in 1960.",
                           "is_supporting": True},
                          {"idx": 2, "title": "Other", "paragraph_text": "Unrelated text.", "is_supporting": False}]}


def test_musique_reader(tmp_path):
    unanswerable = dict(MUSIQUE, id="2hop__2", answerable=False)
    result = read_musique(_jsonl(tmp_path / "m.jsonl", [MUSIQUE, unanswerable]))
    (item,) = result.items
    assert item.answers == ["1960", "in 1960"]
    assert [d.title for d in item.supporting_docs] == ["The Collegian", "HBU"]
    assert [d.text for d in item.distractor_docs] == ["Unrelated text."]
    assert result.skipped == {"unanswerable": 1}


def _para(**changes):
    return [dict(MUSIQUE["paragraphs"][0], **changes)] + MUSIQUE["paragraphs"][1:]


@pytest.mark.parametrize("row, error, message", [
    ("{not json", ValueError, r"m.jsonl:2: malformed JSON"),
    ({k: v for k, v in MUSIQUE.items() if k != "answer"}, ValueError, r"m.jsonl:2: missing field 'answer'"),
    (dict(MUSIQUE, answer="", answer_aliases=[]), ValueError, r"m.jsonl:2: no non-empty gold answer"),
    (dict(MUSIQUE, answer_aliases="1960"), TypeError, r"m.jsonl:2: field 'answer_aliases' must be a list"),
    (dict(MUSIQUE, paragraphs=_para(is_supporting="yes")), TypeError,
     r"m.jsonl:2 paragraphs\[0\]: field 'is_supporting' must be true/false"),
    (dict(MUSIQUE, paragraphs=_para(paragraph_text=None)), TypeError,
     r"m.jsonl:2 paragraphs\[0\]: field 'paragraph_text' must be a string"),
    (dict(MUSIQUE, paragraphs=[dict(p, is_supporting=False) for p in MUSIQUE["paragraphs"]]), ValueError,
     r"m.jsonl:2: no paragraph has is_supporting=true"),
    (dict(MUSIQUE, id="2hop__1"), ValueError, r"m.jsonl:2: duplicate id"),
])
def test_musique_errors(tmp_path, row, error, message):
    with pytest.raises(error, match=message):
        read_musique(_jsonl(tmp_path / "m.jsonl", [MUSIQUE, row]))


GENERIC = {"id": "g1", "question": "Who?", "answers": ["Ann"],
           "supporting_docs": [{"title": "T", "text": "Ann did it."}],
           "distractor_docs": ["Bob did not."]}


def test_generic_reader_jsonl_and_parquet(tmp_path):
    rows = [GENERIC, {"question": "Q2", "answer": "Bo", "supporting_docs": ["Bo is here."]}]
    (a, b) = read_generic(_jsonl(tmp_path / "g.jsonl", rows)).items
    assert (a.id, a.answers, a.supporting_docs[0].title) == ("g1", ["Ann"], "T")
    assert a.distractor_docs[0].text == "Bob did not."
    assert (b.id, b.answers, b.supporting_docs[0].title) == ("g-1", ["Bo"], "")
    import datasets

    datasets.Dataset.from_list([GENERIC, dict(GENERIC, id="g2", answers=[""])]).to_parquet(str(tmp_path / "g.parquet"))
    with pytest.raises(ValueError, match=r"g.parquet row 1: no non-empty gold answer"):
        read_generic(tmp_path / "g.parquet")
    assert read_generic(tmp_path / "g.parquet", max_items=1).items[0].supporting_docs[0].text == "Ann did it."


@pytest.mark.parametrize("row, error, message", [
    ({k: v for k, v in GENERIC.items() if k != "question"}, ValueError, r"g.jsonl:1: missing field 'question'"),
    (dict(GENERIC, answers=[]), ValueError, r"g.jsonl:1: no non-empty gold answer"),
    (dict(GENERIC, answers=None), TypeError, r"g.jsonl:1: field 'answers' must be a list"),
    (dict(GENERIC, supporting_docs=[]), ValueError, r"g.jsonl:1: field 'supporting_docs' is empty"),
    (dict(GENERIC, supporting_docs=[{"title": "T"}]), ValueError,
     r"g.jsonl:1 supporting_docs\[0\]: missing field 'text'"),
    (dict(GENERIC, supporting_docs=[5]), TypeError, r"g.jsonl:1 supporting_docs\[0\]: a document must be"),
    (dict(GENERIC, distractor_docs="x"), TypeError, r"g.jsonl:1: field 'distractor_docs' must be a list"),
])
def test_generic_errors(tmp_path, row, error, message):
    with pytest.raises(error, match=message):
        read_generic(_jsonl(tmp_path / "g.jsonl", [row]))


def test_unsupported_file_type_and_empty_pool(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_generic(tmp_path / "x.csv")
    (tmp_path / "pool.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="distractor pool is empty"):
        read_distractor_pool(tmp_path / "pool.jsonl")


def test_atomic_write_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "out.jsonl"

    def rows():
        yield {"id": 1}
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(target, rows())
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp file
    write_jsonl(target, [{"id": 1}])
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write("half")
        raise RuntimeError("crash")
    assert target.read_text(encoding="utf-8") == '{"id": 1}\n'  # the old complete file survives
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


@pytest.mark.parametrize("changes, message", [
    ({"source": "musique"}, "needs data.input_path"),
    ({"input_path": "x.jsonl"}, "does not read files"),
    ({"source": "generic", "input_path": "x.jsonl", "synthetic_num_hops": [2, 2]},
     "synthetic_num_hops is set but unused"),
    ({"evidence_position": "depth"}, "needs data.evidence_depths"),
    ({"evidence_position": "depth", "evidence_depths": [1.5]}, "outside"),
    ({"evidence_depths": [0.5]}, "only used with"),
    ({"prompt_template": "{documents}"}, r"must contain \{question\}"),
    ({"doc_template": "{text} {url}"}, r"unknown placeholder\(s\) \{url\}"),
    ({"answer_regex": "answer: .+"}, "capturing group"),
    ({"answer_regex": "("}, "not a valid regex"),
    ({"num_responses": 1}, "num_responses must be >= 2"),
    ({"sampling_temperature": 0.0}, "must be > 0"),
    ({"pair_strategy": "best"}, "is not one of"),
    ({"long_target_tokens": []}, "non-empty list"),
    ({"sampling_device": "gpu"}, "use auto, cpu, cuda"),
    ({"sampling_backend": "scripted", "sampling_top_p": 0.9}, "unused with data.sampling_backend=scripted"),
])
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**changes)


def test_config_through_the_experiment_loader():
    config_module = pytest.importorskip("megatron_solopo.config")
    try:
        config_module.experiment_config_class()
    except ImportError as err:  # another room's section is not written yet
        pytest.skip(f"experiment config incomplete: {err}")
    config = config_module.load_config({"data": {"num_responses": 4}}, ["data.long_target_tokens=[1024, 2048]"])
    assert (config.data.num_responses, config.data.long_target_tokens) == (4, [1024, 2048])
    with pytest.raises(ValueError, match="data.num_respones"):
        config_module.load_config({"data": {"num_respones": 4}})


def test_example_configs_load_and_the_sample_config_matches():
    import pathlib

    config_module = pytest.importorskip("megatron_solopo.config")
    try:
        config_module.experiment_config_class()
    except ImportError as err:
        pytest.skip(f"experiment config incomplete: {err}")
    from megatron_solopo.data.bundled import sample_config

    examples = sorted((pathlib.Path(__file__).parents[2] / "examples" / "configs" / "data").glob("*.yaml"))
    assert len(examples) >= 4
    loaded = {path.stem: config_module.load_config(path).data for path in examples}
    scripted = loaded["sample_scripted"]
    expected = sample_config(scripted.output_dir, scripted.pairs_path)
    assert {**vars(expected), "sampling_model": scripted.sampling_model} == vars(scripted)


def test_every_option_is_documented():
    import dataclasses
    import pathlib

    doc = (pathlib.Path(__file__).parents[2] / "docs" / "data.md").read_text(encoding="utf-8")
    missing = [f.name for f in dataclasses.fields(DataConfig) if f"| `{f.name}` |" not in doc]
    assert not missing, f"docs/data.md lacks rows for {missing}"
