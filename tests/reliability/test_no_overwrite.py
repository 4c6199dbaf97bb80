"""Nothing another run or another setting produced is replaced without being asked (issue 26): `solopo
build-data` refuses an output directory or a pairs file of another build (`--overwrite` replaces), a failed or
refused `solopo train` leaves the run's config.yaml and run_summary.json as they were (and no new directory),
a finished run stays finished, a shorter `train.steps` than the checkpoint is refused, and a failed conversion
leaves no --output behind. Each case asserts the exit status, one line naming the path or setting, and the
hashes of every file that existed before.

The commands run in this process (cli.main); the finished run directory is a copy of the session's shared one
(tests/conftest.py `finished_tiny_run`: a subprocess, since it saves, which starts dist_checkpointing's
writer process).
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
from tiny_runs import tiny_run_command
from test_user_errors import SAMPLE_PAIRS, TOKENIZER, _one_line_error, _tiny_hf_model, _tree_hash

from megatron_solopo.cli import main
from megatron_solopo.console import EXIT_USER_ERROR

REPO = pathlib.Path(__file__).resolve().parents[2]
DATA_CONFIG = REPO / "examples" / "configs" / "data" / "sample_scripted.yaml"


# ------------------------------------------------------------------------------------ build-data
def _build(out: pathlib.Path, *overrides: str) -> int:
    return main(["build-data", "--config", str(DATA_CONFIG), "--no-tokenize", "--no-progress",
                 f"data.sampling_model={TOKENIZER}", f"data.output_dir={out}", "data.pairs_path=null",
                 "data.synthetic_num_items=12", *overrides])


def test_build_data_refuses_a_pairs_file_no_build_of_these_settings_wrote(tmp_path, capsys):
    pairs = tmp_path / "sample" / "pairs.jsonl"  # like the packaged sample: no summary.json records it
    pairs.parent.mkdir()
    shutil.copyfile(SAMPLE_PAIRS, pairs)
    before = _tree_hash(tmp_path)
    assert _build(tmp_path / "out", f"data.pairs_path={pairs}") == EXIT_USER_ERROR
    line = _one_line_error(capsys, "build-data")
    assert f"data.pairs_path={pairs}" in line and "35 pairs" in line and "--overwrite" in line
    assert _tree_hash(tmp_path) == before and not (tmp_path / "out").exists()  # refused before anything is made
    assert _build(tmp_path / "out", f"data.pairs_path={pairs}", "--overwrite") == 0
    assert len(pairs.read_text().splitlines()) < 35  # replaced, as asked


def test_build_data_refuses_its_own_output_dir_with_other_settings_and_reruns_the_same(tmp_path, capsys):
    out = tmp_path / "out"
    assert _build(out) == 0
    capsys.readouterr()
    before = _tree_hash(out)
    assert _build(out, "data.seed=7") == EXIT_USER_ERROR
    line = _one_line_error(capsys, "build-data")
    assert f"data.output_dir={out}" in line and "data.seed 2024 -> 7" in line and "--overwrite" in line
    assert _tree_hash(out) == before
    assert _build(out) == 0  # the same settings again: allowed, the same pairs
    assert _tree_hash(out)["pairs.jsonl"] == before["pairs.jsonl"]
    (out / "pairs.jsonl").write_text((out / "pairs.jsonl").read_text().splitlines()[0] + "\n")  # edited by hand
    capsys.readouterr()
    edited = _tree_hash(out)
    assert _build(out) == EXIT_USER_ERROR
    assert "pairs_sha256" in _one_line_error(capsys, "build-data")
    assert _tree_hash(out) == edited


# ------------------------------------------------------------------------------------ train
def _train_args(run: pathlib.Path, cache: pathlib.Path, *overrides: str) -> list[str]:
    """The shared finished run's `solopo train` arguments (tests/tiny_runs.py), then `overrides`."""
    return tiny_run_command(run, cache, *overrides)[3:]  # without `python -m megatron_solopo.cli`


@pytest.fixture(scope="module")
def finished(tmp_path_factory, finished_tiny_run):
    """A copy of the session's finished 3-step run (made by a subprocess) and its data cache."""
    shared, cache = finished_tiny_run
    run = shutil.copytree(shared, tmp_path_factory.mktemp("finished") / "run")
    assert json.loads((run / "run_summary.json").read_text())["last_metrics"]["loss"] > 0
    return run, cache


@pytest.mark.parametrize("override, names", [
    ("model.tokenizer=/nonexistent/tokenizer", "/nonexistent/tokenizer"),
    ("train.distributed_optimizer=true", "train.distributed_optimizer"),
    ("train.steps=1", "train.steps=1"),
])
def test_a_refused_train_leaves_the_run_files_as_they_were(finished, override, names, capsys):
    run, cache = finished
    before = _tree_hash(run)
    assert main(_train_args(run, cache, override)) == EXIT_USER_ERROR
    assert names in _one_line_error(capsys, "train")
    assert _tree_hash(run) == before  # config.yaml, run_summary.json, checkpoints: untouched


def test_rerunning_a_finished_run_keeps_its_summary(finished, capsys):
    run, cache = finished
    before = _tree_hash(run)
    assert main(_train_args(run, cache)) == 0
    assert "already finished at step 3/3" in capsys.readouterr().out
    assert _tree_hash(run) == before


def test_a_failed_train_into_a_new_directory_leaves_nothing(finished, tmp_path, capsys):
    _, cache = finished
    assert main(_train_args(tmp_path / "new", cache, "model.tokenizer=/nonexistent/tokenizer")) == EXIT_USER_ERROR
    _one_line_error(capsys, "train")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------ conversions
def test_a_failed_conversion_leaves_no_output(tmp_path, capsys):
    hf_dir = _tiny_hf_model(tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    config["num_key_value_heads"] = config["num_attention_heads"]  # the weights have fewer KV heads
    (hf_dir / "config.json").write_text(json.dumps(config))
    before = _tree_hash(tmp_path)
    for output in (tmp_path / "new", tmp_path / "empty"):
        if output.name == "empty":
            output.mkdir()
        assert main(["convert", "hf-to-mcore", "--hf-model", str(hf_dir), "--output", str(output)]) == EXIT_USER_ERROR
        line = _one_line_error(capsys, "convert")
        assert str(hf_dir / "config.json") in line and "num_key_value_heads" in line
        assert not output.exists() if output.name == "new" else not any(output.iterdir())
    assert {k: v for k, v in _tree_hash(tmp_path).items() if k in before} == before


# ------------------------------------------------------------------------------------ precompute-ref
def test_precompute_ref_reuses_its_own_table_and_refuses_another(tmp_path, capsys):
    lines = SAMPLE_PAIRS.read_text(encoding="utf-8").splitlines()
    for name, count in (("a", 6), ("b", 5)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines[:count]) + "\n", encoding="utf-8")
    table = tmp_path / "reference_logps.pt"

    def precompute(pairs: str, *extra: str) -> int:
        return main(["precompute-ref", "--config", str(REPO / "examples" / "configs" / "tiny_cpu_solo_dpo.yaml"),
                     f"model.tokenizer={TOKENIZER}", f"data.pairs_path={tmp_path / pairs}",
                     f"data.cache_dir={tmp_path / 'cache'}", "--output", str(table), *extra])

    assert precompute("a.jsonl") == 0
    capsys.readouterr()
    before = _tree_hash(tmp_path)
    assert precompute("a.jsonl") == 0  # the same pairs and model: kept, nothing computed
    assert "already holds the reference log-probs of these 6 pairs" in capsys.readouterr().out
    assert precompute("b.jsonl") == EXIT_USER_ERROR  # other pairs: was silently replaced
    line = _one_line_error(capsys, "precompute-ref")
    assert str(table) in line and "--overwrite" in line
    assert _tree_hash(tmp_path)["reference_logps.pt"] == before["reference_logps.pt"]
    assert precompute("b.jsonl", "--overwrite") == 0
    assert _tree_hash(tmp_path)["reference_logps.pt"] != before["reference_logps.pt"]
