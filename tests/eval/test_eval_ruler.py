"""The RULER-style eval suites: cells, short/long pairing by question, the all-values scoring rule in
reports, and config errors (whitespace token counter: no model, no tokenizer training)."""

import pathlib

import pytest

from megatron_solopo.data.contexts import TokenCounter
from megatron_solopo.eval.config import EvalConfig
from megatron_solopo.eval.metrics import score_prediction
from megatron_solopo.eval.report import build_report, plot_accuracy_vs_length, report_markdown
from megatron_solopo.eval.suites import build_suites

REGEX = r"answer\s*(?:is)?\s*[:：]\s*(.+)"
SUITES = ["ruler_niah_multikey", "ruler_niah_multikey_short", "ruler_niah_multivalue", "ruler_niah_multivalue_short"]


@pytest.fixture(scope="module")
def built():
    config = EvalConfig(suites=SUITES, context_lengths=[500, 900], depths=[0.0, 0.5, 1.0], num_samples=3)
    return build_suites(config, TokenCounter(lambda text: len(text.split())))


def _of(built, suite):
    return [i for i in built.items if i.suite == suite]


def test_cells_and_short_long_pairing(built):
    assert not any(built.skipped.values()), built.skipped
    for task in ("niah_multikey", "niah_multivalue"):
        long, short = _of(built, f"ruler_{task}"), _of(built, f"ruler_{task}_short")
        assert len(long) == 3 * 2 * 3 and len(short) == 3  # questions x lengths x depths; one short each
        assert {i.source_id for i in long} == {i.source_id for i in short}
        assert all(i.context_length is None and i.depth is None for i in short)
        for item in long:
            partner = next(s for s in short if s.source_id == item.source_id)
            assert (item.question, item.answers) == (partner.question, partner.answers)
            assert abs(item.prompt_tokens - item.context_length) <= 0.05 * item.context_length
            assert partner.prompt_tokens < item.prompt_tokens
    depths = sorted((i.depth, i.meta["evidence_depths"][0]) for i in _of(built, "ruler_niah_multikey")
                    if i.context_length == 900 and i.source_id == _of(built, "ruler_niah_multikey")[0].source_id)
    assert [d for d, _ in depths] == [0.0, 0.5, 1.0] and depths[0][1] == 0.0 < depths[1][1] < depths[2][1]


def test_answer_match_travels_with_the_items(built):
    assert {i.answer_match for i in _of(built, "ruler_niah_multivalue")} == {"all"}
    assert all(i.meta["answer_match"] == "all" for i in _of(built, "ruler_niah_multivalue_short"))
    assert {i.answer_match for i in _of(built, "ruler_niah_multikey")} == {"any"}
    item = _of(built, "ruler_niah_multivalue_short")[0]
    full = score_prediction(f"Answer: {', '.join(item.answers)}", item.answers, "final_answer", REGEX, 12,
                            item.answer_match)
    half = score_prediction(f"Answer: {', '.join(item.answers[:2])}", item.answers, "final_answer", REGEX, 12,
                            item.answer_match)
    assert (full["sub_em"], half["sub_em"]) == (1.0, 0.0)
    assert half["f1"] == pytest.approx(2 / 3)  # 2 of 4 values, nothing else
    as_any = score_prediction(f"Answer: {item.answers[0]}", item.answers, "final_answer", REGEX, 12)
    assert as_any["sub_em"] == 1.0  # the default rule would take one value as right


def test_report_shows_ruler_suites_with_their_short_baseline(built, tmp_path):
    records = []
    for item in built.items:
        right = item.suite.endswith("_short") or item.depth == 0.0
        prediction = f"Answer: {', '.join(item.answers) if right else '1234567'}"
        scores = score_prediction(prediction, item.answers, "final_answer", REGEX, 12, item.answer_match)
        records.append({"suite": item.suite, "item_id": item.item_id, "source_id": item.source_id,
                        "question": item.question, "answers": item.answers, "context_length": item.context_length,
                        "depth": item.depth, "prompt_tokens": item.prompt_tokens, "input_tokens": item.prompt_tokens,
                        "prediction": prediction, **scores, "generated_tokens": 5, "meta": item.meta})
    report = build_report(
        items=records, skipped=built.skipped,
        model={"label": "m", "kind": "hf", "path": "/m", "fingerprint": "ab" * 32, "step": None, "tokenizer": "/m",
               "tokenizer_fingerprint": "cd" * 32},
        generation={"backend": "hf", "path": "hf-generate", "device": "cpu", "dtype": "float32",
                    "max_new_tokens": 8, "batch_size": 2, "greedy": True},
        config={"eval": {"suites": SUITES}, "prompt": {}},
        timing={"seconds_total": 1.0, "seconds_build": 0.1, "seconds_generate": 0.9, "num_prompts": len(records),
                "prompt_tokens": 1, "generated_tokens": 1, "generated_tokens_per_second": 1.0},
        long_suites=EvalConfig(suites=SUITES).long_suites)
    assert report["suites"]["ruler_niah_multivalue_short"]["sub_em"] == 100.0
    # right only at depth 0: one of three depths at each length
    assert report["suites"]["ruler_niah_multivalue"]["sub_em"] == pytest.approx(100 / 3, abs=1e-3)
    assert {(r["suite"], r["context_length"]) for r in report["by_length"]} == {
        (s, n) for s in ("ruler_niah_multikey", "ruler_niah_multivalue") for n in (500, 900)}
    text = report_markdown(report)
    assert "| ruler_niah_multikey_short | 100.0 |" in text and "| ruler_niah_multivalue | 900 | 0.5 | 0.0 | 3 |" in text
    path = plot_accuracy_vs_length(report, tmp_path / "a.png")
    assert pathlib.Path(path).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("overrides, message", [
    ({"suites": ["ruler_niah_single"], "ruler_num_values": 3},
     r"eval\.ruler_num_values is set but no suite uses it \(it sizes ruler_niah_multivalue\)"),
    ({"suites": ["ruler_niah_multikey"], "ruler_num_distractors": 0},
     r"eval\.ruler_num_distractors must be >= 1 for niah_multikey"),
    ({"suites": ["ruler_variable_tracking_short"], "ruler_num_hops": 0},
     r"eval\.ruler_num_hops must be an integer >= 1"),
    ({"suites": ["ruler_needle"]}, "unknown suite"),
])
def test_ruler_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**overrides)


def test_ruler_settings_size_only_their_suites():
    config = EvalConfig(suites=["ruler_niah_single", "ruler_niah_multikey"], ruler_num_distractors=5)
    assert config.ruler_spec("niah_multikey").setting("num_distractors") == 5
    assert config.ruler_spec("niah_single").num_distractors is None
    assert config.long_suites == ["ruler_niah_single", "ruler_niah_multikey"]


def test_eval_refuses_answer_lists_longer_than_max_answer_words():
    from megatron_solopo.data.config import DataConfig
    from megatron_solopo.eval.evaluate import _check_answer_words

    long_chain = EvalConfig(suites=["ruler_variable_tracking_short"], ruler_num_hops=12)
    with pytest.raises(ValueError, match=r"lists 13 values, more than data\.max_answer_words=12"):
        _check_answer_words(long_chain, DataConfig())
    _check_answer_words(long_chain, DataConfig(max_answer_words=None))  # no limit: fine
    _check_answer_words(EvalConfig(suites=["ruler_variable_tracking"]), DataConfig())  # 5 names <= 12
