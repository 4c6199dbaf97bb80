"""`solopo experiment --quick` end to end on a tiny random model: every stage connects, the table is
made, and a second invocation resumes (skips the finished stages)."""

import json
import pathlib
import subprocess
import sys

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "experiments" / "solopo_vs_long_135m.yaml"


def test_example_experiments_load():
    from megatron_solopo.experiment.config import load_quality_config

    for path in sorted((REPO / "examples" / "experiments").glob("*.yaml")):
        config = load_quality_config(path)
        assert {"solo-orpo", "long-orpo", "expand-long-orpo"} <= {arm.name for arm in config.arms}, path
        assert config.pair_sets() == ["short", "long"]


@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory, tiny_hf_dir):
    """The example's quick overrides with two arms (one per pair set) on the tiny HF model; the SoLo arm
    chooses its alpha from two candidates on a validation split, and the file pre-registers a decision."""
    example = yaml.safe_load(EXAMPLE.read_text())
    example["arms"] = [arm for arm in example["arms"] if arm["name"] in ("solo-orpo", "long-orpo")]
    solo = example["arms"][0]
    solo["objective"].pop("alpha", None)
    solo["alpha_candidates"] = [0.3, 1.0]
    example["validation"] = ["eval.seed=7"]
    example["preregistration"] = {
        "primary_suite": "multihop", "primary_context_length": 512, "primary_depth": 0.0,  # a cell --quick asks
        "primary_comparisons": [["long-orpo", "solo-orpo"]], "pilot_discordance": 0.5, "pilot": "made up",
        "items_per_cell": 14, "detect_points": 50.0}
    example["shared"]["eval"].update(num_samples=14, context_lengths=[512, 2048])
    example["comparisons"] = [["long-orpo", "solo-orpo"]]
    example["bootstrap_resamples"] = 500
    example["shared"]["model"]["hf_model"] = tiny_hf_dir
    path = tmp_path_factory.mktemp("experiment") / "tiny.yaml"
    path.write_text(yaml.safe_dump(example))
    return path


def _run(config, run_dir, *extra):
    return subprocess.run([sys.executable, "-m", "megatron_solopo.cli", "experiment", "--config", str(config),
                           "--run-dir", str(run_dir), "--quick", *extra], capture_output=True, text=True,
                          timeout=600)


def test_quick_experiment_runs_every_stage_and_resumes(tiny_experiment, tmp_path):
    run_dir = tmp_path / "run"
    first = _run(tiny_experiment, run_dir, "--arms", "solo-orpo")  # run 1 of 2: one arm, the shared stages
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    stages = sorted(p.stem for p in (run_dir / "stages").glob("*.json"))
    assert stages == ["data-long", "data-short", "eval-base", "eval-solo-orpo", "eval-val-solo-orpo.alpha-0.3",
                      "eval-val-solo-orpo.alpha-1", "train-solo-orpo.alpha-0.3", "train-solo-orpo.alpha-1"]
    assert "analysis without long-orpo" in first.stdout
    choice = json.loads((run_dir / "selection" / "solo-orpo.json").read_text())
    assert choice["alpha"] in (0.3, 1.0) and [row["alpha"] for row in choice["rows"]] == [0.3, 1.0]
    assert choice["cell"] == "multihop @ 512, depth 0"  # the pre-registered primary cell
    validation = yaml.safe_load((run_dir / "configs" / "eval-val-solo-orpo.alpha-1.yaml").read_text())
    assert validation["eval"]["seed"] == 7
    eval_solo = " ".join(json.loads((run_dir / "stages" / "eval-solo-orpo.json").read_text())["command"].split())
    assert f"train/{choice['candidate']}/" in eval_solo  # the test eval is the chosen candidate's checkpoint

    second = _run(tiny_experiment, run_dir, "--arms", "long-orpo", "--publish", str(tmp_path / "published"))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count("skipped") == 3  # data-short, data-long, eval-base: shared with run 1
    stages = sorted(p.stem for p in (run_dir / "stages").glob("*.json"))
    assert len(stages) == 10 and "train-long-orpo" in stages and "eval-long-orpo" in stages
    results = json.loads((run_dir / "results" / "results.json").read_text())
    assert results["arms"] == ["base", "solo-orpo", "long-orpo"]
    assert {(row["a"], row["b"]) for row in results["comparisons"]} == {
        ("long-orpo", "solo-orpo"), ("base", "solo-orpo"), ("base", "long-orpo")}
    primary, short = results["preregistered"]
    assert (primary["a"], primary["b"], primary["cell"]) == ("long-orpo", "solo-orpo", "multihop @ 512, depth 0")
    assert (short["a"], short["b"], short["cell"]) == ("base", "solo-orpo", "short")
    assert results["selection"]["solo-orpo"]["test_overlap"] == 0  # another eval seed: other questions
    assert set(results["training_cost"]) == {"solo-orpo", "long-orpo"}
    assert all(cost["distinct_pairs"] for cost in results["training_cost"].values())
    table = (run_dir / "results" / "table.md").read_text()
    assert "--quick" in table and "McNemar" in table and "s / pair" in table
    assert table.index("### Pre-registered decisions") < table.index("### Alpha selection") < table.index("per arm and cell")
    for pair_set in ("short", "long"):  # sampling cost: every question of a fresh run was sampled now
        sampled = json.loads((run_dir / "data" / pair_set / "summary.json").read_text())["counts"]["sampled_questions"]
        assert f"| x_{pair_set} | {sampled} |" in table and results["sampling"][pair_set]["prompt_tokens"] > 0
    # long-X trains on pairs sampled on x_long, the others on x_short
    train_long = yaml.safe_load((run_dir / "configs" / "train-long-orpo.yaml").read_text())
    assert train_long["data"]["sample_on"] == "long" and train_long["objective"]["mode"] == "long"
    # training diagnostics: every arm held out and scored the same pairs (the x_short set's first), SoLo
    # measured its RA gradient share, and the table shows both
    train_solo = yaml.safe_load((run_dir / "configs" / "train-solo-orpo.alpha-1.yaml").read_text())
    heldout_file = str(run_dir / "data" / "short" / "pairs.jsonl")
    assert train_solo["train"]["heldout_pairs_path"] == train_long["train"]["heldout_pairs_path"] == heldout_file
    diagnostics = results["training_diagnostics"]
    assert diagnostics["solo-orpo"]["heldout_ids"] == diagnostics["long-orpo"]["heldout_ids"]
    assert len(diagnostics["solo-orpo"]["heldout_ids"]) == 1
    assert diagnostics["solo-orpo"]["ra_grad_share_mean"] > 0 and diagnostics["long-orpo"]["ra_grad_share_mean"] is None
    assert "### Training diagnostics" in table and "the same pairs for every arm" in table
    published = tmp_path / "published"
    assert (published / "table.md").is_file() and (published / "eval" / "base.json").is_file()
    texts = [f.read_text() for f in published.rglob("*") if f.suffix in (".json", ".jsonl", ".yaml", ".md")]
    assert not any(str(run_dir.resolve()) in text for text in texts)  # committed files: no paths of this machine
    assert any("<run_dir>" in text for text in texts)

    assert (published / "selection" / "solo-orpo.json").is_file()
    assert (published / "eval-val" / "solo-orpo.alpha-0.3.json").is_file()
    assert (published / "train" / f"{choice['candidate']}.metrics.jsonl").is_file()

    third = _run(tiny_experiment, run_dir)
    assert third.returncode == 0, third.stderr[-3000:]
    assert third.stdout.count("skipped") == len(stages)


def test_a_run_dir_refuses_other_settings(tiny_experiment, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "experiment.json").write_text(json.dumps({"quick": False}))
    result = _run(tiny_experiment, run_dir)
    assert result.returncode != 0
    assert "holds a run with other settings" in result.stderr
