"""The quality experiment's analysis on hand-made reports and logs (experiment/analysis.py)."""

import json

import pytest

from megatron_solopo.experiment.analysis import analyze, cell_scores, markdown, training_cost, write_results


def _report(scores, prompt_tokens=1000, generated=50, seconds=10.0):
    """Items: two lengths x two depths, plus one short-suite item; `scores` in that order."""
    cells = [(512, 0.0), (512, 1.0), (1024, 0.0), (1024, 1.0)]
    items = [{"suite": "multihop", "item_id": f"q{i}/L{length}/d{depth}", "context_length": length, "depth": depth,
              "sub_em": float(score), "em": 0.0, "f1": 0.5 * score}
             for i, ((length, depth), score) in enumerate(zip(cells * 2, scores[:-1]))]
    items.append({"suite": "short", "item_id": "s0", "context_length": None, "depth": None,
                  "sub_em": float(scores[-1]), "em": 0.0, "f1": 0.0})
    return {"items": items, "timing": {"prompt_tokens": prompt_tokens, "generated_tokens": generated,
                                       "seconds_generate": seconds}}


BASE = _report([0, 0, 0, 0, 1, 0, 0, 0, 1])
SOLO = _report([1, 1, 1, 0, 1, 1, 1, 0, 1])


def test_cells_hold_each_item_once_per_level():
    cells = cell_scores(SOLO, "sub_em")
    assert set(cells) == {("multihop", "all", "all"), ("multihop", 512, "all"), ("multihop", 1024, "all"),
                          ("multihop", 512, 0.0), ("multihop", 512, 1.0), ("multihop", 1024, 0.0),
                          ("multihop", 1024, 1.0), ("short", "all", "all")}
    assert len(cells[("multihop", "all", "all")]) == 8
    assert sum(cells[("multihop", 512, "all")].values()) == 4  # q0, q1, q4, q5


def test_accuracy_and_paired_rows_by_hand():
    results = analyze({"base": BASE, "solo": SOLO}, {}, [("base", "solo")], "sub_em", resamples=2000, seed=0)
    rows = {row["cell"]: row for row in results["accuracy"]}
    assert rows["multihop"]["arms"]["base"]["mean"] == pytest.approx(1 / 8)
    assert rows["multihop"]["arms"]["solo"]["mean"] == pytest.approx(6 / 8)
    assert rows["short"]["arms"]["solo"]["n"] == 1
    comparisons = {row["cell"]: row for row in results["comparisons"]}
    pooled = comparisons["multihop"]
    # base right only where solo is right too: 5 items solo only, 0 base only -> p = 2 / 2^5
    assert (pooled["only_b"], pooled["only_a"], pooled["n"]) == (5, 0, 8)
    assert pooled["diff"] == pytest.approx(5 / 8)
    assert pooled["p_mcnemar"] == pytest.approx(2 / 32)
    assert pooled["lo"] > 0.0
    assert comparisons["short"]["diff"] == 0.0 and comparisons["short"]["p_mcnemar"] == 1.0


def test_items_missing_from_one_report_are_left_out_of_the_comparison():
    partial = {**SOLO, "items": SOLO["items"][1:]}
    results = analyze({"base": BASE, "solo": partial}, {}, [("base", "solo")], "sub_em", resamples=500, seed=0)
    pooled = next(row for row in results["comparisons"] if row["cell"] == "multihop")
    assert pooled["n"] == 7


def test_f1_uses_the_paired_bootstrap_only():
    results = analyze({"base": BASE, "solo": SOLO}, {}, [("base", "solo")], "f1", resamples=500, seed=0)
    pooled = next(row for row in results["comparisons"] if row["cell"] == "multihop")
    assert "p_mcnemar" not in pooled
    assert pooled["diff"] == pytest.approx(0.5 * 5 / 8)


def test_training_cost_skips_the_warmup_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    steps = [{"step": 1, "step_time_s": 30.0, "pairs": 2, "peak_mem_gib": 1.0, "tokens": 1000, "loss": 1.0},
             {"step": 2, "step_time_s": 4.0, "pairs": 2, "peak_mem_gib": 1.5, "tokens": 1000, "loss": 0.9},
             {"step": 3, "step_time_s": 6.0, "pairs": 2, "peak_mem_gib": 1.2, "tokens": 1200, "loss": 0.8}]
    path.write_text("\n".join(json.dumps(s) for s in steps) + "\n{\"event\": \"end\"}\n")
    cost = training_cost(path)
    assert cost["pairs"] == 6 and cost["steps_timed"] == 2
    assert cost["seconds_per_pair_median"] == pytest.approx(2.5)  # (2 + 3) / 2
    assert cost["peak_mem_gib"] == 1.5 and cost["final_loss"] == 0.8
    with pytest.raises(ValueError, match="no training steps"):
        (tmp_path / "empty.jsonl").write_text("")
        training_cost(tmp_path / "empty.jsonl")


def test_markdown_and_files(tmp_path):
    costs = {"solo": {"pairs": 4, "seconds_per_pair_median": 2.0, "peak_mem_gib": 1.0, "tokens_per_pair": 900}}
    results = analyze({"base": BASE, "solo": SOLO}, costs, [("base", "solo")], "sub_em", resamples=500, seed=0)
    text = markdown(results, {"solo": "scripted responses"})
    assert "solo (ablation: scripted responses)" in text
    assert "| solo vs base | multihop | 8 | 62.5 [" in text
    assert "| base | - | - | - | - | 100 | 5.0 |" in text  # 1000 prompt tokens, 50 generated in 10 s
    paths = write_results(results, tmp_path / "out")
    assert {"json", "table", "accuracy_plot", "cost_plot"} <= set(paths)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["arms"] == ["base", "solo"]
