"""`solopo experiment --publish` then `--restore`: a run split in two continues from the committed folder on
another clone or machine (the pin, the stage markers and what later stages read come back, with this
machine's paths), and a run directory that already holds a run is never overwritten."""

import json
import pathlib
import tempfile

import pytest

from megatron_solopo.commands.experiment import publish, restore
from megatron_solopo.console import UserError
from megatron_solopo.experiment.config import load_quality_config

REPO = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "experiments" / "solopo_ruler_135m.yaml"


def _write(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _finished_run(run_dir: pathlib.Path) -> dict[str, str]:
    """A run directory after run 1 of 2 (data, base, long-orpo), as files -> text; paths of this machine inside."""
    home_model = str(pathlib.Path.home() / ".cache" / "model" / "hf")
    files = {
        "experiment.json": json.dumps({"config_file": str(REPO / "examples" / "x.yaml"), "model": home_model}),
        "machine.json": json.dumps({"machine": "x86_64, 2 cores"}),
        "configs/train-long-orpo.yaml": f"data:\n  pairs_path: {run_dir}/data/long/pairs.jsonl\n",
        "stages/data-short.json": json.dumps({"command": f"solopo build-data --config {run_dir}/configs/d.yaml",
                                              "seconds": 1071.0}),
        "stages/eval-base.json": json.dumps({"command": "solopo eval", "seconds": 900.0}),
        "stages/fetch.json": json.dumps({"command": "solopo fetch-default-model", "seconds": 3.0}),
        "data/short/summary.json": json.dumps({"pairs_path": f"{run_dir}/data/short/pairs.jsonl"}),
        "data/short/pairs.jsonl": '{"id": "q1", "prompt": "~ a tilde ~/ stays in the data"}\n',
        "data/long/summary.json": "{}",
        "data/long/pairs.jsonl": '{"id": "q2"}\n',
        "eval/base/report.json": json.dumps({"model": f"{run_dir}/x"}),
        "eval/long-orpo/report.json": "{}",
        "train/long-orpo/metrics.jsonl": '{"step": 1, "loss": 0.5}\n',
        "train/long-orpo/run_summary.json": "{}",
        "results/table.md": "| arm |\n",
    }
    for name, text in files.items():
        _write(run_dir / name, text)
    _write(run_dir / "train" / "long-orpo" / "checkpoints" / "step_000032" / "weights.bin", "not published")
    return files


def test_publish_replaces_the_temporary_folder_only_where_it_begins_a_path(tmp_path):
    """An eval of a checkpoint names its temporary HF export (<tmp>/solopo-eval-hf-*) in its report; a
    folder that merely ends in tmp, or a name that starts with it, is not that folder."""
    experiment = load_quality_config(EXAMPLE)
    run, published = tmp_path / "run1", tmp_path / "published"
    _finished_run(run)
    temp = tempfile.gettempdir()
    report = {"model": f"{temp}/solopo-eval-hf-abc", "other": f"/home/me{temp}/x", "name": f"{temp}files/y"}
    _write(run / "eval" / "long-orpo" / "report.json", json.dumps(report))
    publish(run, experiment, published)
    assert json.loads((published / "eval" / "long-orpo.json").read_text()) == {
        "model": "<tmp>/solopo-eval-hf-abc", "other": f"/home/me{temp}/x", "name": f"{temp}files/y"}


def test_publish_then_restore_gives_back_the_finished_stages_with_this_machines_paths(tmp_path):
    experiment = load_quality_config(EXAMPLE)
    first, published, second = tmp_path / "run1", tmp_path / "published", tmp_path / "elsewhere" / "run"
    files = _finished_run(first)
    publish(first, experiment, published)
    committed = [p.read_text() for p in published.rglob("*") if p.is_file()]
    assert not any(str(first) in text or str(pathlib.Path.home()) in text for text in committed)
    assert (published / "data" / "pairs-short.jsonl").is_file() and (published / "stages" / "eval-base.json").is_file()

    restored = restore(published, second)
    # everything but results/ (the analysis writes it again) and the fetch marker (the model cache is this
    # machine's: the stage runs again, a no-op where the model is cached)
    assert restored == len(files) - 2 and not (second / "stages" / "fetch.json").exists()
    for name, text in files.items():
        if name.startswith("results/") or name == "stages/fetch.json":
            continue
        back = (second / name).read_text()
        if name in ("experiment.json", "configs/train-long-orpo.yaml", "stages/data-short.json"):
            assert back == text.replace(str(first), str(second)), name  # the pin and stage commands: paths here
        elif name.endswith("pairs.jsonl") or name.endswith("metrics.jsonl"):
            assert back == text, name  # data as published, the tildes of the text untouched
    assert json.loads((second / "eval" / "base" / "report.json").read_text())["model"] == "<run_dir>/x"
    assert not (second / "train" / "long-orpo" / "checkpoints").exists()


def test_restore_never_replaces_a_run(tmp_path):
    experiment = load_quality_config(EXAMPLE)
    _finished_run(tmp_path / "run1")
    publish(tmp_path / "run1", experiment, tmp_path / "published")
    before = (tmp_path / "run1" / "experiment.json").read_text()
    with pytest.raises(UserError, match="already holds a run; nothing was replaced"):
        restore(tmp_path / "published", tmp_path / "run1")
    assert (tmp_path / "run1" / "experiment.json").read_text() == before
    with pytest.raises(UserError, match="no experiment.json or stage markers"):
        restore(tmp_path / "run1" / "results", tmp_path / "new")
