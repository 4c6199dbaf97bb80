"""ParallelConfig validation, YAML + dotted overrides, unknown keys, `solopo env`."""

import dataclasses
import subprocess
import sys

import pytest

from megatron_solopo.config import ConfigError, apply_overrides, from_dict, load_section, parse_override
from megatron_solopo.model import ModelConfig, get_preset
from megatron_solopo.parallel import ParallelConfig


def test_bad_tp_names_the_constraint():
    preset = get_preset("tiny")  # 4 heads, 2 kv heads
    with pytest.raises(ValueError, match=r"attention heads \(4\) % tp \(3\)"):
        ParallelConfig(tp=3).check_model(preset.num_layers, preset.num_attention_heads,
                                         preset.num_query_groups, preset.vocab_size)
    with pytest.raises(ValueError, match=r"kv heads / query groups \(2\) % tp \(4\)"):
        ParallelConfig(tp=4).check_model(2, 4, 2)
    with pytest.raises(ValueError, match=r"layers \(2\) % \(pp\*virtual_pp\) \(4\)"):
        ParallelConfig(pp=4).check_model(2, 4, 2)


def test_world_size_must_divide():
    assert ParallelConfig(tp=2, cp=2).dp_size(8) == 2
    with pytest.raises(ValueError, match="world size 6 is not divisible by tp\\*pp\\*cp"):
        ParallelConfig(tp=2, pp=2).dp_size(6)


def test_parallel_field_validation():
    with pytest.raises(ValueError, match="parallel.tp must be a positive integer"):
        ParallelConfig(tp=0)
    with pytest.raises(ValueError, match="cp_comm_type"):
        ParallelConfig(cp_comm_type="ring")
    with pytest.raises(ValueError, match="sequence_parallel=true needs parallel.tp > 1"):
        ParallelConfig(sequence_parallel=True)


def test_overrides_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tp: 2\ncp_comm_type: a2a\n")
    config = load_section(ParallelConfig, path, ["cp=4", "sequence_parallel=true"])
    assert (config.tp, config.cp, config.cp_comm_type, config.sequence_parallel) == (2, 4, "a2a", True)
    assert parse_override("train.lr=1e-6") == (["train", "lr"], 1e-6)
    assert apply_overrides({}, ["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) parallel.tensor_parallel.*valid keys"):
        from_dict(ParallelConfig, {"tensor_parallel": 2}, "parallel")
    with pytest.raises(ConfigError, match="parallel.tp: expected an integer"):
        from_dict(ParallelConfig, {"tp": "two"}, "parallel")


def test_model_config_rejects_fp8_without_te():
    with pytest.raises(ValueError, match="needs Transformer Engine"):
        ModelConfig(attention_backend="sdpa", fp8="hybrid")
    assert dataclasses.asdict(ModelConfig())["attention_backend"] == "auto"


def test_preset_parameter_counts_match_published_sizes():
    # published: Llama-3.1-8B 8.03B, Qwen2.5-7B 7.62B, SmolLM2-135M 134.5M (tied embeddings)
    assert abs(get_preset("llama3.1-8b").num_parameters() / 1e9 - 8.03) < 0.01
    assert abs(get_preset("qwen2.5-7b").num_parameters() / 1e9 - 7.62) < 0.01
    assert abs(get_preset("smollm2-135m").num_parameters() / 1e6 - 134.5) < 0.5


def test_solopo_env_runs_without_gpu():
    out = subprocess.run([sys.executable, "-m", "megatron_solopo.cli", "env", "--presets"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "megatron_core" in out.stdout and "Traceback" not in out.stderr
    assert "smollm2-135m" in out.stdout


def test_no_requirement_names_apex():
    import pathlib
    import re

    setup_py = (pathlib.Path(__file__).parents[1] / "setup.py").read_text()
    requirement_strings = re.findall(r'"([^"]+)"', setup_py.split("setup(")[0])
    assert not [r for r in requirement_strings if re.match(r"^apex\b", r)]
