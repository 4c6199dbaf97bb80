"""Eval config validation, scoring and aggregation on hand-made predictions, the report schema, tables,
and what the suites build (with a whitespace token counter: no model, no tokenizer training)."""

import json
import pathlib

import pytest

from megatron_solopo.eval.config import EvalConfig
from megatron_solopo.eval.metrics import aggregate, aggregate_by, cell_table, score_prediction
from megatron_solopo.eval.report import (
    build_report,
    compare_markdown,
    load_report,
    plot_accuracy_vs_length,
    plot_comparison,
    plot_depth_heatmap,
    report_markdown,
    validate_report,
)

REGEX = r"answer\s*(?:is)?\s*[:：]\s*(.+)"


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides, message", [
    ({"suites": ["multihop", "needle"]}, "unknown suite"),
    ({"suites": []}, "eval.suites is empty"),
    ({"suites": ["jsonl"]}, "jsonl_paths must be given exactly when"),
    ({"jsonl_paths": ["x.jsonl"]}, "jsonl_paths must be given exactly when"),
    ({"context_lengths": [4096, 1024]}, "must be increasing"),
    ({"depths": [0.0, 1.5]}, "values in \\[0, 1\\]"),
    ({"num_hops": [3, 2]}, "num_hops"),
    ({"suites": ["niah_multi"], "num_hops": [1, 3]}, "niah_multi"),
    ({"backend": "vllm"}, "eval.backend"),
    ({"megatron_decode": "recompute"}, "only applies to eval.backend=megatron"),
    ({"device": "gpu"}, "eval.device"),
    ({"batch_size": 0}, "eval.batch_size must be a positive integer"),
    ({"jsonl_max_items": 5}, "jsonl suite is not in eval.suites"),
])
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**overrides)


def test_config_long_suites_keep_order():
    config = EvalConfig(suites=["short", "niah_multi", "multihop"], num_hops=[2, 2])
    assert config.long_suites == ["niah_multi", "multihop"]


# ------------------------------------------------------------------------------------------ scoring
def test_score_prediction_final_answer_line():
    # the gold answer appears in the reasoning but the final answer is wrong: scores 0 (as in pair building)
    wrong = score_prediction("The Kelmor Institute employs her.\nAnswer: Dagny Vell", ["Kelmor Institute"],
                             "final_answer", REGEX)
    assert (wrong["final_answer"], wrong["sub_em"], wrong["em"], wrong["f1"]) == ("Dagny Vell", 0.0, 0.0, 0.0)
    right = score_prediction("Reasoning.\nAnswer: the Kelmor Institute, founded 1890",
                             ["Kelmor Institute"], "final_answer", REGEX)
    # normalized prediction "kelmor institute founded 1890" contains the gold: sub-EM 1, EM 0,
    # F1: overlap 2, precision 2/4, recall 2/2 -> 2 * 0.5 * 1 / 1.5 = 2/3
    assert right["sub_em"] == 1.0 and right["em"] == 0.0
    assert right["f1"] == pytest.approx(2 / 3)
    missing = score_prediction("Kelmor Institute", ["Kelmor Institute"], "final_answer", REGEX)
    assert missing == {"final_answer": None, "sub_em": 0.0, "em": 0.0, "f1": 0.0}


def test_score_prediction_whole_response():
    out = score_prediction("  Kelmor Institute  ", ["kelmor institute"], "whole_response", REGEX)
    assert (out["sub_em"], out["em"], out["f1"]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="unknown answer extraction"):
        score_prediction("x", ["y"], "first_line", REGEX)


# ------------------------------------------------------------------------------------------ aggregation
def _record(suite, length, depth, sub_em, em, f1, item_id):
    return {"suite": suite, "item_id": item_id, "source_id": item_id.split("/")[1], "question": "q?",
            "answers": ["a"], "context_length": length, "depth": depth, "prompt_tokens": 10, "input_tokens": 14,
            "prediction": "Answer: a", "final_answer": "a", "sub_em": sub_em, "em": em, "f1": f1,
            "generated_tokens": 3, "meta": {}}


RECORDS = [
    _record("multihop", 1024, 0.0, 1.0, 1.0, 1.0, "multihop/a/L1024/d0"),
    _record("multihop", 1024, 0.0, 0.0, 0.0, 0.5, "multihop/b/L1024/d0"),
    _record("multihop", 1024, 1.0, 1.0, 0.0, 0.5, "multihop/a/L1024/d1"),
    _record("multihop", 4096, 0.0, 0.0, 0.0, 0.0, "multihop/a/L4096/d0"),
    _record("short", None, None, 1.0, 1.0, 1.0, "short/a"),
]


def test_aggregate_hand_computed():
    overall = aggregate(RECORDS)
    # sub-EM 3/5, EM 2/5, F1 (1 + .5 + .5 + 0 + 1)/5 = 0.6
    assert overall == {"num_items": 5, "sub_em": 60.0, "em": 40.0, "f1": 60.0}
    assert aggregate([]) == {"num_items": 0, "sub_em": 0.0, "em": 0.0, "f1": 0.0}


def test_aggregate_by_groups_and_orders():
    rows = aggregate_by(RECORDS, ("suite", "context_length"))
    assert [(r["suite"], r["context_length"], r["num_items"]) for r in rows] == [
        ("multihop", 1024, 3), ("multihop", 4096, 1), ("short", None, 1)]
    assert rows[0]["sub_em"] == pytest.approx(200 / 3, abs=1e-3)
    cells = cell_table(RECORDS)
    assert [(c["suite"], c["context_length"], c["depth"], c["num_items"], c["sub_em"]) for c in cells] == [
        ("multihop", 1024, 0.0, 2, 50.0), ("multihop", 1024, 1.0, 1, 100.0), ("multihop", 4096, 0.0, 1, 0.0),
        ("short", None, None, 1, 100.0)]


# ------------------------------------------------------------------------------------------ report
def _report(label="base", records=RECORDS):
    return build_report(
        items=records, skipped={"multihop": {"not_enough_distractors": 2}, "short": {}},
        model={"label": label, "kind": "hf", "path": f"/models/{label}", "fingerprint": "ab" * 32, "step": None,
               "tokenizer": f"/models/{label}", "tokenizer_fingerprint": "cd" * 32},
        generation={"backend": "hf", "path": "hf-generate", "device": "cpu", "dtype": "float32",
                    "max_new_tokens": 8, "batch_size": 2, "greedy": True},
        config={"eval": {"suites": ["multihop", "short"]}, "prompt": {}},
        timing={"seconds_total": 1.0, "seconds_build": 0.1, "seconds_generate": 0.9, "num_prompts": 5,
                "prompt_tokens": 50, "generated_tokens": 15, "generated_tokens_per_second": 16.7},
        long_suites=["multihop"])


def test_report_contents_and_schema():
    report = _report()
    assert report["overall"]["sub_em"] == 60.0
    assert report["suites"]["short"] == {"sub_em": 100.0, "em": 100.0, "f1": 100.0, "num_items": 1}
    assert [(r["suite"], r["context_length"]) for r in report["by_length"]] == [("multihop", 1024), ("multihop", 4096)]
    assert report["skipped"]["multihop"] == {"not_enough_distractors": 2}
    json.dumps(report)  # JSON-serializable as is
    broken = json.loads(json.dumps(report))
    del broken["model"]["fingerprint"]
    broken["items"][0]["sub_em"] = "1"
    with pytest.raises(ValueError, match=r"report\.model\.fingerprint: missing.*items\[0\]\.sub_em: expected"):
        validate_report(broken)
    broken = json.loads(json.dumps(report))
    broken["generation"]["greedy"] = 1  # an int is not a bool
    with pytest.raises(ValueError, match="report.generation.greedy"):
        validate_report(broken)


def test_load_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_report(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_report(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"schema_version": 1}))
    with pytest.raises(ValueError, match="report.kind: missing"):
        load_report(wrong)


def test_markdown_tables_and_plots(tmp_path):
    base = _report("base")
    trained_records = [dict(r, sub_em=1.0) for r in RECORDS]
    trained = _report("trained", trained_records)
    text = report_markdown(base)
    assert "| overall | 60.0 | 40.0 | 60.0 | 5 |" in text
    assert "not_enough_distractors x2" in text
    table = compare_markdown([base, trained])
    lines = table.splitlines()
    assert lines[0] == "| metric (%) | base | trained |"
    assert "| overall sub_em | 60.0 | 100.0 |" in lines
    assert "| multihop @ 4K sub-EM | 0.0 | 100.0 |" in lines
    assert "| short sub-EM | 100.0 | 100.0 |" in lines
    for path in (plot_accuracy_vs_length(base, tmp_path / "a.png"), plot_depth_heatmap(base, tmp_path / "h.png"),
                 plot_comparison([base, trained], tmp_path / "c.png")):
        assert pathlib.Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_depth = _report("x", [RECORDS[-1]])
    assert plot_depth_heatmap(no_depth, tmp_path / "none.png") is None


# ------------------------------------------------------------------------------------------ suites
def _word_counter():
    from megatron_solopo.data.contexts import TokenCounter

    return TokenCounter(lambda text: len(text.split()))


def test_suites_cells_depths_and_reproducibility():
    from megatron_solopo.eval.suites import build_suites

    config = EvalConfig(suites=["multihop", "niah_single", "niah_multi", "short"], context_lengths=[600, 1200],
                        depths=[0.0, 0.5, 1.0], num_samples=2, num_hops=[2, 2])
    built = build_suites(config, _word_counter())
    by_suite = {}
    for item in built.items:
        by_suite.setdefault(item.suite, []).append(item)
    # 2 questions x 2 lengths x 3 depths (depth suites), x 2 lengths (niah_multi), 2 short, minus skips
    for suite, expected in (("multihop", 12), ("niah_single", 12), ("niah_multi", 4), ("short", 2)):
        skipped = sum(built.skipped[suite].values())
        assert len(by_suite[suite]) + skipped == expected, (suite, built.skipped)
    assert len({i.item_id for i in built.items}) == len(built.items)
    # every question is asked in every cell; only the evidence moves with depth
    multihop = by_suite["multihop"]
    for source_id in {i.source_id for i in multihop}:
        at_1200 = sorted((i for i in multihop if i.source_id == source_id and i.context_length == 1200),
                         key=lambda i: i.depth)
        if len(at_1200) == 3:
            firsts = [i.meta["evidence_depths"][0] for i in at_1200]
            assert firsts[0] == 0.0 and firsts[0] < firsts[1] < firsts[2]
            assert {i.question for i in at_1200} == {at_1200[0].question}
            for item in at_1200:  # within 5% of the target, measured by the same counter
                assert abs(item.prompt_tokens - 1200) <= 0.05 * 1200
    # short = the multihop questions with evidence only; single-doc suite has one-hop questions
    assert {i.source_id for i in by_suite["short"]} == {i.source_id for i in multihop}
    assert all(i.context_length is None and i.depth is None for i in by_suite["short"])
    assert all(i.meta["num_hops"] == 1 for i in by_suite["niah_single"])
    assert all(i.depth is None and len(i.meta["evidence_positions"]) == 2 for i in by_suite["niah_multi"])
    again = build_suites(config, _word_counter())
    assert [i.prompt for i in again.items] == [i.prompt for i in built.items]


def test_eval_questions_come_from_the_eval_namespace():
    from megatron_solopo.eval.suites import build_suites

    # ids "syn-eval-<seed>-N" are what generate_synthetic_qa(entity_namespace="eval") produces; the
    # data tests prove the eval and train namespaces share no entity
    items = build_suites(EvalConfig(suites=["short"], num_samples=4), _word_counter()).items
    assert len(items) == 4 and all(i.source_id.startswith("syn-eval-") for i in items)


def test_jsonl_suite_reads_generic_rows(tmp_path):
    from megatron_solopo.eval.suites import build_suites

    path = tmp_path / "qa.jsonl"
    rows = [{"id": "q1", "question": "Who?", "answers": ["Ann"], "supporting_docs": [{"title": "T", "text": "Ann did."}]},
            {"id": "q2", "question": "When?", "answer": "1900", "supporting_docs": ["It was 1900."],
             "distractor_docs": ["Noise " * 700]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = EvalConfig(suites=["jsonl"], jsonl_paths=[str(path)], context_lengths=[64, 1024])
    items = build_suites(config, _word_counter()).items
    assert [(i.source_id, i.answers, i.context_length) for i in items] == [("q1", ["Ann"], 64),
                                                                          ("q2", ["1900"], 1024)]
    assert "Ann did." in items[0].prompt and items[1].prompt.index("It was 1900.") < items[1].prompt.index("Noise")
