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
    """The example's quick overrides with two arms (one per pair set) on the tiny HF model."""
    example = yaml.safe_load(EXAMPLE.read_text())
    example["arms"] = [arm for arm in example["arms"] if arm["name"] in ("solo-orpo", "long-orpo")]
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
    first = _run(tiny_experiment, run_dir, "--publish", str(tmp_path / "published"))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    stages = sorted(p.stem for p in (run_dir / "stages").glob("*.json"))
    assert stages == ["data-long", "data-short", "eval-base", "eval-long-orpo", "eval-solo-orpo",
                      "train-long-orpo", "train-solo-orpo"]
    results = json.loads((run_dir / "results" / "results.json").read_text())
    assert results["arms"] == ["base", "solo-orpo", "long-orpo"]
    assert {(row["a"], row["b"]) for row in results["comparisons"]} == {
        ("long-orpo", "solo-orpo"), ("base", "solo-orpo"), ("base", "long-orpo")}
    assert set(results["training_cost"]) == {"solo-orpo", "long-orpo"}
    table = (run_dir / "results" / "table.md").read_text()
    assert "--quick" in table and "McNemar" in table and "s / pair" in table
    for pair_set in ("short", "long"):  # sampling cost: every question of a fresh run was sampled now
        sampled = json.loads((run_dir / "data" / pair_set / "summary.json").read_text())["counts"]["sampled_questions"]
        assert f"| x_{pair_set} | {sampled} |" in table and results["sampling"][pair_set]["prompt_tokens"] > 0
    # long-X trains on pairs sampled on x_long, the others on x_short
    train_long = yaml.safe_load((run_dir / "configs" / "train-long-orpo.yaml").read_text())
    assert train_long["data"]["sample_on"] == "long" and train_long["objective"]["mode"] == "long"
    published = tmp_path / "published"
    assert (published / "table.md").is_file() and (published / "eval" / "base.json").is_file()
    texts = [f.read_text() for f in published.rglob("*") if f.suffix in (".json", ".jsonl", ".yaml", ".md")]
    assert not any(str(run_dir.resolve()) in text for text in texts)  # committed files: no paths of this machine
    assert any("<run_dir>" in text for text in texts)

    second = _run(tiny_experiment, run_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("skipped") == len(stages)


def test_a_run_dir_refuses_other_settings(tiny_experiment, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "experiment.json").write_text(json.dumps({"quick": False}))
    result = _run(tiny_experiment, run_dir)
    assert result.returncode != 0
    assert "holds a run with other settings" in result.stderr
