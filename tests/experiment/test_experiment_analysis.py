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


def test_training_cost_counts_the_steps_between_logged_ones(tmp_path):
    """log_every 4 over 12 steps of 2 pairs: the 3 logged steps stand for 24 pair updates, not 6 (the RULER
    run's first table counted records); a step logged again after a resume counts once."""
    path = tmp_path / "metrics.jsonl"
    logged = [{"step": s, "step_time_s": 8.0, "pairs": 2, "tokens": 100, "loss": 1.0} for s in (4, 8, 8, 12)]
    path.write_text("\n".join(json.dumps(r) for r in [{"step": 0, "heldout/point": "before"}, *logged]) + "\n")
    cost = training_cost(path)
    assert cost["pairs"] == 24 and cost["steps"] == 12 and cost["steps_timed"] == 2


def test_markdown_and_files(tmp_path):
    costs = {"solo": {"pairs": 4, "seconds_per_pair_median": 2.0, "peak_mem_gib": 1.0, "tokens_per_pair": 900}}
    results = analyze({"base": BASE, "solo": SOLO}, costs, [("base", "solo")], "sub_em", resamples=500, seed=0)
    text = markdown(results, {"solo": "scripted responses"})
    assert "solo (ablation: scripted responses)" in text
    assert "| solo vs base | multihop | 8 | 62.5 [" in text
    assert "| base | - | - | - | - | - | 100 | 5.0 | 0.0% | 0.0% |" in text  # 1000 prompt tokens, 50 generated in 10 s
    paths = write_results(results, tmp_path / "out")
    assert {"json", "table", "accuracy_plot", "cost_plot"} <= set(paths)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["arms"] == ["base", "solo"]


def _summary(tmp_path, arm, before, after, share=None, ids=("q1", "q2")):
    """A run_summary.json with held-out scores (before, after: short chosen, long chosen) and the RA share."""
    def point(short, long):
        return {"heldout/short_chosen_mean_logp": short, "heldout/long_chosen_mean_logp": long,
                "heldout/short_rejected_mean_logp": short - 1.0, "heldout/long_rejected_mean_logp": long - 1.0,
                "heldout/chosen_gap_short_minus_long": short - long, "heldout/pairs": float(len(ids))}

    diagnostics = {"heldout": {"pairs": len(ids), "ids": list(ids), "source": "pairs.jsonl",
                               "before": point(*before), "after": point(*after)}}
    if share is not None:
        diagnostics.update(ra_grad_share_mean=share, grad_cos_ra_po_mean=-0.25)
    (tmp_path / arm).mkdir()
    (tmp_path / arm / "run_summary.json").write_text(json.dumps({"diagnostics": diagnostics}))
    return tmp_path / arm


def test_training_diagnostics_table(tmp_path):
    from megatron_solopo.experiment.analysis import training_diagnostics

    solo = training_diagnostics(_summary(tmp_path, "solo", before=(-0.5, -0.75), after=(-0.875, -0.625), share=0.8))
    long = training_diagnostics(_summary(tmp_path, "long", before=(-0.5, -0.75), after=(-0.25, -0.5)))
    assert solo["short_chosen"] == {"before": -0.5, "after": -0.875}
    assert solo["chosen_gap_short_minus_long"] == {"before": 0.25, "after": -0.25}
    assert solo["ra_grad_share_mean"] == 0.8 and long["ra_grad_share_mean"] is None
    assert training_diagnostics(tmp_path / "missing") == {}
    results = analyze({"base": BASE, "solo": SOLO}, {}, [("base", "solo")], "sub_em", resamples=500, seed=0)
    results["training_diagnostics"] = {"solo": solo, "long": long}
    text = markdown(results)
    assert "### Training diagnostics" in text and "the same pairs for every arm" in text
    # the short side falls for solo (-0.375) and rises for long (+0.25); only solo has an RA share
    assert ("| solo | -0.500 -> -0.875 (-0.375) | -0.750 -> -0.625 (+0.125) | -1.500 -> -1.875 (-0.375) | "
            "-1.750 -> -1.625 (+0.125) | 0.250 -> -0.250 (-0.500) | 0.800 | -0.250 |") in text
    assert "| long | -0.500 -> -0.250 (+0.250) |" in text and text.rstrip().endswith("| - | - |")
    other = training_diagnostics(_summary(tmp_path, "other", (-0.5, -0.75), (-0.5, -0.75), ids=("q3", "q4")))
    results["training_diagnostics"]["other"] = other
    assert "NOT the same pairs for every arm" in markdown(results)


def test_prediction_quality_counts_loops_and_answer_lines():
    from megatron_solopo.experiment.analysis import prediction_quality

    loop = "the cat sat on the cat sat on the cat sat on"  # "the cat sat on" three times
    items = [{"prediction": loop, "final_answer": None},
             {"prediction": "the cat sat on the mat. the cat sat on it", "final_answer": "mat"},  # twice only
             {"prediction": "Answer: 42", "final_answer": "42"},
             {"prediction": "", "final_answer": None}]
    quality = prediction_quality({"items": items})
    assert quality == {"items": 4, "repetition_rate": 0.25, "answer_format_rate": 0.5}


def test_question_overlap_by_question_and_answers():
    from megatron_solopo.experiment.analysis import question_overlap

    def report(*pairs):
        return {"items": [{"question": q, "answers": list(a)} for q, a in pairs]}

    val = [report(("q1", ["a"]), ("q2", ["b"]))]
    assert question_overlap(val, [report(("q3", ["a"]), ("q1", ["z"]))]) == 0  # same text, other answer
    assert question_overlap(val, [report(("q2", ["b"]), ("q3", ["c"]))]) == 1


def _prereg(**kw):
    from megatron_solopo.experiment.config import Preregistration

    fields = dict(primary_suite="multihop", primary_context_length=512, primary_depth=0.0,
                  primary_comparisons=[["base", "solo"], ["base", "missing"]], pilot_discordance=0.3, pilot="x",
                  items_per_cell=234)
    return Preregistration(**{**fields, **kw})


def test_preregistered_rows_give_verdicts_from_the_comparisons():
    from megatron_solopo.experiment.analysis import preregistered_rows

    results = analyze({"base": BASE, "solo": SOLO}, {}, [("base", "solo")], "sub_em", resamples=500, seed=0)
    rows = preregistered_rows(results["comparisons"], _prereg(), ["solo"])
    primary, missing, short = rows
    # (multihop, 512, depth 0) holds q0 and q4: base 0, 1; solo 1, 1
    assert (primary["cell"], primary["n"], primary["diff"]) == ("multihop @ 512, depth 0", 2, 0.5)
    assert primary["verdict"] == "no significant difference"  # 2 items: McNemar p = 0.5
    assert missing["verdict"] == "not evaluated"
    assert (short["cell"], short["diff"]) == ("short", 0.0) and short["verdict"].startswith("holds")
    worse = _report([0, 0, 0, 0, 1, 0, 0, 0, 0])  # loses the short item: -100 points
    results = analyze({"base": BASE, "solo": worse}, {}, [("base", "solo")], "sub_em", resamples=500, seed=0)
    assert preregistered_rows(results["comparisons"], _prereg(), ["solo"])[2]["verdict"].startswith("fails")
    text = markdown({**results, "preregistered": rows})
    assert text.startswith("### Pre-registered decisions") and "| primary | solo vs base | multihop @ 512, depth 0 | 2 |" in text


def test_preregistration_is_checked_against_the_power_calculation():
    with pytest.raises(ValueError, match=r"items_per_cell=233 is below the power calculation: 234 paired items"):
        _prereg(items_per_cell=233)
    with pytest.raises(ValueError, match="only discordant items can differ"):
        _prereg(pilot_discordance=0.05)
    assert _prereg().items_needed() == 234  # (1.95996 * 0.54772 + 0.84162 * 0.53852)^2 / 0.01 = 233.1


def test_alpha_is_chosen_on_the_selection_cell_ties_to_the_first():
    from megatron_solopo.experiment.config import ArmConfig
    from megatron_solopo.experiment.selection import choose_alpha

    arm = ArmConfig(name="solo", objective={"name": "orpo", "mode": "solo"}, alpha_candidates=[1.0, 0.3, 3.0])
    # on (multihop, 512, 0.0): q0 and q4 -> 1.0: 1/2, 0.3: 2/2, 3.0: 2/2 (tie: 0.3 is listed first)
    reports = {1.0: BASE, 0.3: SOLO, 3.0: SOLO}
    choice = choose_alpha(arm, reports, "sub_em", ("multihop", 512, 0.0))
    assert (choice["alpha"], choice["candidate"]) == (0.3, "solo.alpha-0.3")
    assert [row["score"] for row in choice["rows"]] == [0.5, 1.0, 1.0]
    # over all items: BASE 2/9, SOLO 7/9
    assert choose_alpha(arm, {1.0: SOLO, 0.3: BASE, 3.0: SOLO}, "sub_em", None)["alpha"] == 1.0
    with pytest.raises(ValueError, match="no validation report for alpha"):
        choose_alpha(arm, {1.0: SOLO}, "sub_em", None)
    with pytest.raises(ValueError, match="holds no items in multihop @ 4096"):
        choose_alpha(arm, reports, "sub_em", ("multihop", 4096, 0.5))


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha_candidates=[1.0]), "give 2 to 3 distinct values"),
    (dict(alpha_candidates=[0.3, 1.0, 3.0, 10.0]), "give 2 to 3 distinct values"),
    (dict(alpha_candidates=[1.0, 1.0]), "give 2 to 3 distinct values"),
    (dict(alpha_candidates=[-1.0, 1.0]), "a number >= 0"),
    (dict(alpha_candidates=[0.3, 1.0], objective={"name": "orpo", "mode": "long"}), "only a SoLoPO arm"),
    (dict(alpha_candidates=[0.3, 1.0], objective={"name": "orpo", "alpha": 1.0}), "remove objective.alpha"),
])
def test_alpha_candidates_are_validated(kwargs, match):
    from megatron_solopo.experiment.config import ArmConfig

    with pytest.raises(ValueError, match=match):
        ArmConfig(**{"name": "solo", "objective": {"name": "orpo", "mode": "solo"}, **kwargs})


def test_distinct_pairs_from_the_run_summary(tmp_path):
    from megatron_solopo.experiment.analysis import training_cost

    lines = [{"step": s, "step_time_s": 2.0, "pairs": 2, "tokens": 100} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert training_cost(tmp_path / "metrics.jsonl")["distinct_pairs"] is None
    (tmp_path / "run_summary.json").write_text(json.dumps({"train_pairs": 5}))
    cost = training_cost(tmp_path / "metrics.jsonl")
    assert (cost["pairs"], cost["distinct_pairs"]) == (6, 5)
