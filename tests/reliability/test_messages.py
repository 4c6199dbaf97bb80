"""Tracebacks and silent acceptances that became one-line errors naming the setting or file (issue 26): HF
config.json vs weights, a tokenizer of another model, a CUDA device setting on a CPU machine, impossible `solopo
plan` flags and layouts, an ambiguous YAML file, a config path that is a directory or relative to another
working directory, a malformed config.json, a model directory without tokenizer files, a pair whose long context
is shorter than its short one. Each runs cli.main in this process and asserts exit status 2 and one line.
"""

from __future__ import annotations

import json
import pathlib

import pytest
from test_user_errors import CONFIG, SAMPLE_PAIRS, TOKENIZER, _one_line_error, _tiny_hf_model, _tree_hash

from megatron_solopo.cli import main
from megatron_solopo.console import EXIT_USER_ERROR


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> pathlib.Path:
    return _tiny_hf_model(tmp_path_factory.mktemp("hf") / "hf")


def _variant(hf_dir: pathlib.Path, to: pathlib.Path, config_change=None, tensors_change=None) -> pathlib.Path:
    import shutil

    shutil.copytree(hf_dir, to)
    if config_change:
        config = json.loads((to / "config.json").read_text())
        config_change(config)
        (to / "config.json").write_text(json.dumps(config))
    if tensors_change:
        from safetensors.torch import load_file, save_file

        tensors = load_file(to / "model.safetensors")
        tensors_change(tensors)
        save_file(tensors, to / "model.safetensors", metadata={"format": "pt"})
    return to


def _eval(model_args: list[str], tmp_path: pathlib.Path) -> int:
    return main(["eval", "--no-progress", *model_args, "eval.suites=[short]", "eval.num_samples=1",
                 "eval.context_lengths=[512]", "eval.max_new_tokens=4", f"eval.output_dir={tmp_path / 'eval'}"])


# ------------------------------------------------------------------------------------ HF config vs weights
def _more_kv_heads(config):
    config["num_key_value_heads"] = config["num_attention_heads"]


def _wider_k_proj(tensors):
    import torch

    name = "model.layers.0.self_attn.k_proj.weight"
    tensors[name] = torch.zeros(tensors[name].shape[0] + 8, tensors[name].shape[1])


@pytest.mark.parametrize("command", ["convert", "eval"])
@pytest.mark.parametrize("change", ["num_key_value_heads", "k_proj"])
def test_config_json_that_disagrees_with_the_weights(hf_dir, tmp_path, command, change, capsys):
    bad = _variant(hf_dir, tmp_path / "bad", _more_kv_heads if change == "num_key_value_heads" else None,
                   _wider_k_proj if change == "k_proj" else None)
    before = _tree_hash(tmp_path)
    if command == "convert":
        code = main(["convert", "hf-to-mcore", "--hf-model", str(bad), "--output", str(tmp_path / "out")])
    else:
        code = _eval(["--hf-model", str(bad)], tmp_path)
    assert code == EXIT_USER_ERROR  # was: RuntimeError from the QKV mapping / transformers; k_proj converted silently
    line = _one_line_error(capsys, command)
    assert f"{bad / 'config.json'} does not match the weights" in line and "k_proj" in line
    assert not (tmp_path / "out").exists()
    assert {k: v for k, v in _tree_hash(tmp_path).items() if k in before} == before


# ------------------------------------------------------------------------------------ tokenizers
def test_a_tokenizer_of_another_model_is_refused_both_ways(hf_dir, tmp_path, tiny_tokenizer, capsys):
    from tiny_models import build_tiny_llama

    big = pathlib.Path(build_tiny_llama(tmp_path / "big", tiny_tokenizer))  # 1000 tokens; hf_dir has 256
    assert _eval(["--hf-model", str(hf_dir), "--tokenizer", str(big)], tmp_path) == EXIT_USER_ERROR  # was IndexError
    line = _one_line_error(capsys, "eval")
    assert f"the tokenizer at {big}" in line and "vocabulary of 256" in line
    assert _eval(["--hf-model", str(big), "--tokenizer", str(TOKENIZER)], tmp_path) == EXIT_USER_ERROR  # was 0, scores 0
    line = _one_line_error(capsys, "eval")
    assert f"the tokenizer at {TOKENIZER}" in line and f"--hf-model {big}" in line
    assert not (tmp_path / "eval" / "report.json").exists()


def test_a_model_directory_without_tokenizer_files(hf_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((hf_dir / name).read_bytes())
    assert _eval(["--hf-model", str(bare)], tmp_path) == EXIT_USER_ERROR  # was transformers' "install sentencepiece"
    line = _one_line_error(capsys, "eval")
    assert f"{bare} holds no tokenizer files" in line and "--tokenizer" in line


@pytest.mark.parametrize("content, says", [('{"architectures": ["LlamaForCausalLM"],', "is not valid JSON"),
                                           ("[1, 2]", "holds a JSON list"),
                                           (None, "a field has the wrong type")])
def test_a_malformed_config_json_is_named(hf_dir, tmp_path, content, says, capsys):
    def wrong_type(config):
        config["num_attention_heads"] = "four"

    bad = _variant(hf_dir, tmp_path / "bad", wrong_type if content is None else None)
    if content is not None:
        (bad / "config.json").write_text(content)
    assert main(["convert", "hf-to-mcore", "--hf-model", str(bad), "--output", str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys, "convert")
    assert str(bad / "config.json") in line and says in line


# ------------------------------------------------------------------------------------ devices
def test_a_cuda_device_setting_without_cuda(hf_dir, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine (or a test run) without CUDA")
    code = main(["build-data", "--config", str(CONFIG), "--no-progress", "--no-tokenize", "data.pairs_path=null",
                 "data.sampling_backend=hf", f"data.sampling_model={hf_dir}", "data.sampling_device=cuda",
                 f"data.output_dir={tmp_path / 'data'}", "data.synthetic_num_items=2", "data.num_responses=2"])
    assert code == EXIT_USER_ERROR  # was: RuntimeError "Found no NVIDIA driver"
    assert "data.sampling_device=cuda" in _one_line_error(capsys, "build-data")
    assert _eval(["--hf-model", str(hf_dir), "eval.device=cuda"], tmp_path) == EXIT_USER_ERROR
    assert "eval.device=cuda" in _one_line_error(capsys, "eval")


# ------------------------------------------------------------------------------------ plan
@pytest.mark.parametrize("flags, names", [
    (["--tp", "0"], "--tp 0"), (["--cp", "-2"], "--cp -2"),  # were AssertionError tracebacks
    (["--gpus", "0"], "--gpus 0"), (["--gpus", "-8"], "--gpus -8"), (["--gpus", "8", "--gpu-memory-gib", "-5"],
                                                                    "--gpu-memory-gib -5"),
    (["--short", "8K", "--long", "1K"], "--long 1K is shorter than --short 8K"),
    (["--long", "0"], "--long 0"),  # was an error about long_chosen_loss_mask[0]
])
def test_plan_refuses_impossible_flags(flags, names, capsys):
    assert main(["plan", *flags]) == EXIT_USER_ERROR
    assert names in _one_line_error(capsys, "plan")


def test_plan_never_recommends_a_dp_its_global_batch_cannot_divide():
    from megatron_solopo.plan.dry_run import PlanSpec
    from megatron_solopo.plan.search import Assumptions, search_layouts

    result = search_layouts(PlanSpec(preset="tiny", short_tokens=256, long_tokens=1024, response_tokens=32), 6, 80.0,
                            Assumptions(global_batch_pairs=64))
    assert result.fitting() == [] and result.dry_runs == 0  # DP 6 and 3 do not divide 64: nothing dry-run
    assert all(row.status.startswith("pruned: DP does not divide") for row in result.rows)
    assert "has a DP that divides --global-batch-pairs 64" in "\n".join(result.lines())


# ------------------------------------------------------------------------------------ config files and pairs
def test_a_key_given_twice_in_a_yaml_file(tmp_path, capsys):
    config = tmp_path / "dup.yaml"
    config.write_text("train:\n  lr: 1.0e-3\n  steps: 2\n  lr: 5.0e-4\n")
    assert main(["train", "--config", str(config)]) == EXIT_USER_ERROR  # was: the last lr, silently
    line = _one_line_error(capsys, "train")
    assert str(config) in line and "'lr' is given twice (line 2 and line 4)" in line


def test_a_config_path_that_is_a_directory_or_relative_to_elsewhere(tmp_path, monkeypatch, capsys):
    assert main(["train", "--config", str(tmp_path)]) == EXIT_USER_ERROR
    assert f"config file {tmp_path} is a directory" in _one_line_error(capsys, "train")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "examples/configs/tiny_cpu.yaml"]) == EXIT_USER_ERROR
    assert f"(relative to the working directory {tmp_path})" in _one_line_error(capsys, "train")


def test_a_long_context_shorter_than_the_short_one(tmp_path, capsys):
    record = json.loads(SAMPLE_PAIRS.read_text(encoding="utf-8").splitlines()[0])
    record["long_context"], record["short_context"] = record["short_context"], record["long_context"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(record) + "\n", encoding="utf-8")
    code = main(["train", "--config", str(CONFIG), f"model.tokenizer={TOKENIZER}", f"data.pairs_path={pairs}",
                 f"train.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"])
    assert code == EXIT_USER_ERROR
    line = _one_line_error(capsys, "train")
    assert f"{pairs}:1" in line and "long_context" in line and "shorter than short_context" in line
