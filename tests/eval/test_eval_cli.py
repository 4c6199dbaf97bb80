"""`solopo eval` end to end on a tiny random model: report JSON (schema), PNG plots, Markdown, --compare."""

import json
import pathlib

import pytest

from megatron_solopo.cli import main

# small but complete: every suite kind with a depth sweep, two lengths, a short suite
TINY_EVAL = ["eval.suites=[multihop,niah_single,short]", "eval.context_lengths=[256,512]", "eval.depths=[0.0,1.0]",
             "eval.num_samples=2", "eval.num_hops=[2,2]", "eval.max_new_tokens=4", "eval.batch_size=4"]

# the report schema, written out independently of megatron_solopo.eval.report.REPORT_SCHEMA
REQUIRED = {
    "schema_version": int, "kind": str, "created_utc": str, "model": dict, "generation": dict, "config": dict,
    "machine": dict, "versions": dict, "timing": dict, "overall": dict, "suites": dict, "by_length": list,
    "cells": list, "skipped": dict, "items": list,
}
MODEL_KEYS = {"label", "kind", "path", "fingerprint", "step", "tokenizer", "tokenizer_fingerprint"}
ITEM_KEYS = {"suite", "item_id", "source_id", "question", "answers", "context_length", "depth", "prompt_tokens",
             "input_tokens", "prediction", "final_answer", "sub_em", "em", "f1", "generated_tokens", "meta"}
PNG = b"\x89PNG\r\n\x1a\n"


def _run_eval(capsys, *args):
    code = main(["eval", "--no-progress", *args])
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def test_eval_hf_model_end_to_end(tiny_hf_dir, tmp_path, capsys):
    out_dir = tmp_path / "base"
    out = _run_eval(capsys, "--hf-model", tiny_hf_dir, "--label", "base", *TINY_EVAL,
                    f"eval.output_dir={out_dir}")
    assert "base: sub-EM" in out and "report.json" in out
    report = json.loads((out_dir / "report.json").read_text())
    for key, kind in REQUIRED.items():
        assert isinstance(report[key], kind), key
    assert report["schema_version"] == 1 and report["kind"] == "megatron_solopo.eval_report"
    assert MODEL_KEYS <= set(report["model"]) and report["model"]["label"] == "base"
    assert report["generation"]["path"] == "hf-unpadded-prefill" and report["generation"]["greedy"] is True
    assert {"megatron_solopo", "torch", "transformers"} <= set(report["versions"])
    items = report["items"]
    skipped = {s: sum(r.values()) for s, r in report["skipped"].items()}
    # 2 questions x 2 lengths x 2 depths for each depth suite, + 2 short ones
    assert len(items) + sum(skipped.values()) == 2 * 2 * 2 * 2 + 2
    for item in items:
        assert ITEM_KEYS <= set(item)
        assert item["sub_em"] in (0.0, 1.0) and 0.0 <= item["f1"] <= 1.0
        assert item["generated_tokens"] <= 4 and item["input_tokens"] > item["prompt_tokens"]  # chat template
    # aggregates are the means of the items (recomputed here)
    assert report["overall"]["num_items"] == len(items)
    assert report["overall"]["sub_em"] == pytest.approx(100 * sum(i["sub_em"] for i in items) / len(items))
    cell_counts = {(c["suite"], c["context_length"], c["depth"]): c["num_items"] for c in report["cells"]}
    assert sum(cell_counts.values()) == len(items)
    assert (out_dir / "accuracy_vs_length.png").read_bytes()[:8] == PNG
    assert (out_dir / "depth_heatmap.png").read_bytes()[:8] == PNG
    assert (out_dir / "report.md").read_text().startswith("# Eval: base")


def test_eval_compare_reports(tiny_hf_dir, tmp_path, capsys):
    small = ["eval.suites=[short]", "eval.num_samples=2", "eval.max_new_tokens=3"]
    for label in ("base", "trained"):
        _run_eval(capsys, "--hf-model", tiny_hf_dir, "--label", label, *small, f"eval.output_dir={tmp_path / label}")
    # overrides after --compare are recognised as overrides, not report files
    out = _run_eval(capsys, "--compare", str(tmp_path / "base" / "report.json"),
                    str(tmp_path / "trained" / "report.json"), f"eval.output_dir={tmp_path / 'cmp'}")
    assert "| metric (%) | base | trained |" in out
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert table.startswith("| metric (%) | base | trained |") and "| short sub-EM |" in table
    assert "| items | 2 | 2 |" in table


def test_eval_without_a_model_says_what_to_pass(capsys):
    assert main(["eval", "--no-progress"]) == 2
    assert "give --hf-model DIR or --checkpoint DIR" in capsys.readouterr().err


def test_eval_user_errors_exit_2_with_the_fix(tmp_path, capsys):
    code = main(["eval", "--no-progress", "--checkpoint", str(tmp_path), "--tokenizer", str(tmp_path),
                 "eval.suites=[short]", "eval.num_samples=1", f"eval.output_dir={tmp_path}"])
    assert code == 2 and "not a complete checkpoint of this project" in capsys.readouterr().err
    assert not pathlib.Path(tmp_path / "report.json").exists()
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "solopo_checkpoint.json").write_text('{"kind": "trained", "format_version": 2')  # cut short
    assert main(["eval", "--no-progress", "--checkpoint", str(garbled), f"eval.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "not valid JSON" in err and str(garbled / "solopo_checkpoint.json") in err
    assert main(["eval", "--no-progress", "--hf-model", str(tmp_path), "eval.suits=[short]"]) == 2
    assert "unknown config key(s) eval.suits" in capsys.readouterr().err
