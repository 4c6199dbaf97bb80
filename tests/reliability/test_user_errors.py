"""Fault injection for the errors a user can cause (issue 14, items 8-10): untrusted conversion inputs,
unwritable or damaged directories, malformed data files. Each case runs the real `solopo` entry point
(cli.main, in this process: the checks fire before any training step) and asserts the exit status 2,
one line of stderr without a traceback that names the path or setting, and that no earlier file was
modified or deleted (the directory is hashed before and after).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import shutil

import pytest
import torch

from megatron_solopo.cli import main
from megatron_solopo.console import EXIT_USER_ERROR

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"
SAMPLE_PAIRS = REPO / "megatron_solopo" / "resources" / "sample" / "pairs.jsonl"
TOKENIZER = REPO / "megatron_solopo" / "resources" / "sample" / "tokenizer"


def _tree_hash(directory: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    # progress bars (tqdm: "...| 1/1 [00:00<00:00, 9.1it/s]") are not messages
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "/s]" not in line
             and "?it/s" not in line and not line.rstrip().endswith("s/step]")
             and not re.match(r"^[\w -]+: +\d+%\|", line)]  # a bar with a postfix: "train:  50%|...| loss=5.6]"
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"solopo {command}: error: "), err[-3000:]
    return lines[0]


def _train(tmp_path: pathlib.Path, *overrides: str) -> int:
    return main(["train", "--config", str(CONFIG), f"model.tokenizer={TOKENIZER}",
                 f"train.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
                 "train.steps=2", "train.warmup_steps=0", "train.save_every=0", *overrides])


@pytest.fixture()
def a_file(tmp_path) -> pathlib.Path:
    path = tmp_path / "a_file"
    path.write_text("not a directory\n")
    return path


# ------------------------------------------------------------------------------------ directories
@pytest.mark.parametrize("setting", ["train.output_dir", "data.cache_dir"])
def test_train_into_a_path_under_a_file_names_the_setting(tmp_path, a_file, setting, capsys):
    before = _tree_hash(tmp_path)
    assert _train(tmp_path, f"{setting}={a_file / 'sub'}") == EXIT_USER_ERROR
    line = _one_line_error(capsys, "train")
    assert setting in line and str(a_file / "sub") in line
    assert _tree_hash(tmp_path) == before


def test_eval_checks_its_output_dir_before_evaluating(tmp_path, a_file, capsys):
    before = _tree_hash(tmp_path)
    code = main(["eval", "--no-progress", "--hf-model", str(TOKENIZER),
                 "eval.suites=[short]", f"eval.output_dir={a_file / 'x'}"])
    assert code == EXIT_USER_ERROR
    line = _one_line_error(capsys, "eval")
    assert "eval.output_dir" in line and str(a_file) in line
    assert _tree_hash(tmp_path) == before


def test_convert_output_that_is_a_file(tmp_path, a_file, capsys):
    hf_dir = _tiny_hf_model(tmp_path / "hf")
    before = _tree_hash(tmp_path)
    assert main(["convert", "hf-to-mcore", "--hf-model", str(hf_dir), "--output", str(a_file)]) == EXIT_USER_ERROR
    line = _one_line_error(capsys, "convert")
    assert str(a_file) in line and "is a file" in line
    assert _tree_hash(tmp_path) == before


def test_build_data_output_dir_under_a_file(tmp_path, a_file, capsys):
    before = _tree_hash(tmp_path)
    code = main(["build-data", "--config", str(CONFIG), "data.source=synthetic", "data.pairs_path=null",
                 f"data.output_dir={a_file / 'out'}"])
    assert code == EXIT_USER_ERROR
    assert "data.output_dir" in _one_line_error(capsys, "build-data")
    assert _tree_hash(tmp_path) == before


# ------------------------------------------------------------------------------------ data files
def test_non_utf8_pairs_name_the_file_line_and_byte_offset(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    first = SAMPLE_PAIRS.read_text(encoding="utf-8").splitlines()[0]
    pairs.write_bytes(first.encode() + b"\n" + b'{"id": "x\xff\xfe"}\n')
    before = _tree_hash(tmp_path)
    assert _train(tmp_path, f"data.pairs_path={pairs}") == EXIT_USER_ERROR
    line = _one_line_error(capsys, "train")
    offset = len(first.encode()) + 1 + len(b'{"id": "x')
    assert f"{pairs}:2" in line and f"byte offset {offset}" in line and "UTF-8" in line
    assert {k: v for k, v in _tree_hash(tmp_path).items() if k in before} == before


def test_a_wrong_type_in_a_pairs_file_is_one_line(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    record = json.loads(SAMPLE_PAIRS.read_text(encoding="utf-8").splitlines()[0])
    record["chosen"] = 5
    pairs.write_text(json.dumps(record) + "\n", encoding="utf-8")
    assert _train(tmp_path, f"data.pairs_path={pairs}") == EXIT_USER_ERROR
    line = _one_line_error(capsys, "train")
    assert f"{pairs}:1" in line and "'chosen' must be a string" in line


def test_a_truncated_arrow_cache_names_the_directory_to_delete(tmp_path, capsys):
    from megatron_solopo.config import load_config
    from megatron_solopo.data.tokenization import load_tokenized_pairs, load_tokenizer

    config = load_config(CONFIG, [f"data.cache_dir={tmp_path / 'cache'}"])
    load_tokenized_pairs(SAMPLE_PAIRS, load_tokenizer(str(TOKENIZER)), config.data)
    arrow = next((tmp_path / "cache").glob("tokenized-*/data.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    before = _tree_hash(tmp_path / "cache")
    assert _train(tmp_path) == EXIT_USER_ERROR
    line = _one_line_error(capsys, "train")
    assert str(arrow.parent) in line and "delete that directory" in line and "tokenizer" not in line
    assert _tree_hash(tmp_path / "cache") == before


def test_an_empty_eval_jsonl_is_named(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    code = main(["eval", "--no-progress", "--hf-model", str(TOKENIZER), "--config",
                 str(REPO / "examples" / "eval" / "my_qa_sweep.yaml"), f"eval.jsonl_paths=[{empty}]",
                 f"eval.output_dir={tmp_path / 'eval'}"])
    assert code == EXIT_USER_ERROR
    assert str(empty) in _one_line_error(capsys, "eval")


def test_overrides_are_accepted_anywhere_after_the_subcommand(tmp_path, a_file, capsys):
    # the override after --hf-model used to be "unrecognized arguments"; here it must reach the config
    code = main(["eval", "--config", str(REPO / "examples" / "eval" / "my_qa_sweep.yaml"), "eval.num_samples=1",
                 "--hf-model", str(TOKENIZER), f"eval.output_dir={a_file / 'x'}", "--no-progress"])
    assert code == EXIT_USER_ERROR and "eval.output_dir" in _one_line_error(capsys, "eval")
    assert main(["eval", "--hf-model", str(TOKENIZER), "not-an-override"]) == EXIT_USER_ERROR
    assert "not-an-override" in _one_line_error(capsys, "eval")
    with pytest.raises(SystemExit) as exited:  # an unknown flag stays argparse's error
        main(["eval", "--hf-model", str(TOKENIZER), "eval.num_samples=1", "--no-such-flag"])
    assert exited.value.code == 2 and "--no-such-flag" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ conversion
def _tiny_hf_model(directory: pathlib.Path) -> pathlib.Path:
    from megatron_solopo.data.tokenization import load_tokenizer
    from tests.tiny_models import build_tiny_llama

    return pathlib.Path(build_tiny_llama(directory, load_tokenizer(str(TOKENIZER))))


def test_nan_weights_are_refused_with_the_tensor_name(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    hf_dir = _tiny_hf_model(tmp_path / "hf")
    weights = hf_dir / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(n for n in tensors if "mlp" in n)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    before = _tree_hash(tmp_path)
    assert main(["convert", "hf-to-mcore", "--hf-model", str(hf_dir), "--output", str(tmp_path / "out"),
                 "--dtype", "fp32"]) == EXIT_USER_ERROR
    line = _one_line_error(capsys, "convert")
    assert repr(name) in line and "NaN/Inf" in line and str(weights) in line
    assert {k: v for k, v in _tree_hash(tmp_path).items() if k in before} == before


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbled_header"])
def test_damaged_safetensors_are_named(tmp_path, damage, capsys):
    hf_dir = _tiny_hf_model(tmp_path / "hf")
    weights = hf_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                         "garbled_header": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json header}" + data[24:]}[damage])
    before = _tree_hash(tmp_path)
    assert main(["convert", "hf-to-mcore", "--hf-model", str(hf_dir), "--output", str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys, "convert")
    assert str(weights) in line and "corrupt or truncated" in line
    assert {k: v for k, v in _tree_hash(tmp_path).items() if k in before} == before


def test_converted_shards_get_the_usual_file_mode(tmp_path):
    import os

    from megatron_solopo.model.hf.safetensors_io import HFShardWriter

    writer = HFShardWriter(tmp_path / "out")
    writer.add("w", torch.zeros(2))
    writer.finish()
    (tmp_path / "out" / "config.json").write_text("{}")
    modes = {p.name: os.stat(p).st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes


# ------------------------------------------------------------------------------------ messages
def test_os_errors_become_one_line_with_the_path_and_fix():
    import errno

    from megatron_solopo.console import describe_error

    text = describe_error(PermissionError(errno.EACCES, "Permission denied", "/data/run/x"))
    assert text == "/data/run/x: Permission denied (choose a directory you can write or fix its permissions)"
    assert describe_error(ValueError("two\nlines")) == "two lines"


def test_help_describes_the_project():
    from megatron_solopo.cli import DESCRIPTION, build_parser

    assert build_parser().description == DESCRIPTION and DESCRIPTION.endswith(".")


def test_compare_warns_only_on_settings_that_change_scores():
    from megatron_solopo.eval.report import scoring_differences

    def report(**eval_settings):
        return {"config": {"eval": {"suites": ["short"], "output_dir": "a", "label": "x", **eval_settings},
                           "prompt": {"system_prompt": None}}}

    assert scoring_differences([report(output_dir="a", label="base"), report(output_dir="b", label="t")]) == []
    assert scoring_differences([report(), report(suites=["multihop"])]) == ["eval.suites"]


def test_the_cli_hides_dependency_warnings_only():
    import warnings

    from megatron_solopo.console import mute_dependency_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        mute_dependency_warnings()  # what `solopo` does first
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning)
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
        warnings.warn("the learning rate schedule looks odd", UserWarning)  # not a dependency warning: shown
    assert [str(w.message) for w in caught] == ["the learning rate schedule looks odd"]


@pytest.fixture(autouse=True)
def _no_leftover_copies(tmp_path):
    yield
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


def test_a_layout_error_under_torchrun_is_printed_once_and_reaches_the_launcher_summary(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "-m", "megatron_solopo.cli",
         "train", "--config", str(CONFIG), "parallel.tp=2", f"train.output_dir={tmp_path / 'run'}",
         f"data.cache_dir={tmp_path / 'cache'}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    message = "solopo train: error: world size 3 is not divisible by tp*pp*cp"
    own_lines = [line for line in result.stderr.splitlines() if line.startswith(message)]
    assert len(own_lines) == 1, result.stderr[-3000:]  # rank 0 only, and no rank printed a traceback
    assert "megatron_solopo" not in result.stderr.split("Traceback")[-1].split("ChildFailedError")[0]
    assert f"traceback : {message}" in result.stderr  # torchrun's "Root Cause" shows the line
    assert "exitcode: 2" in result.stderr


def test_a_second_model_never_overwrites_the_first_models_report(tmp_path):
    from megatron_solopo.eval.report import report_dir

    def report(label, fingerprint):
        return {"model": {"label": label, "fingerprint": fingerprint}}

    out = tmp_path / "eval"
    assert report_dir(report("base", "f0"), out) == out  # empty: the directory itself
    out.mkdir()
    (out / "report.json").write_text(json.dumps(report("base", "f0")))
    (out / "depth_heatmap.png").write_bytes(b"png of base")
    assert report_dir(report("base", "f0"), out) == out  # the same model again replaces its own files
    assert report_dir(report("trained/step 4", "f1"), out) == out / "trained_step_4"
    (out / "trained_step_4").mkdir()
    (out / "trained_step_4" / "report.json").write_text(json.dumps(report("trained/step 4", "f1")))
    assert report_dir(report("trained/step 4", "f2"), out) == out / "trained_step_4-2"  # same label, other weights
    (out / "report.json").write_text("{garbled")
    assert report_dir(report("base", "f0"), out) == out / "base"  # an unreadable report is kept, not replaced
