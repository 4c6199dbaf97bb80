"""The family registry (model/families/): one description per HF family, read by presets, the config.json
reader and the weight loader; and the rooms' import direction (checkpoint/ and model/ never import
convert/). Fast, no Megatron import."""

import ast
import importlib
import pathlib

import pytest

from megatron_solopo.model.families import (
    ArchitectureFamily,
    WindowSwitch,
    family,
    family_names,
    get_family,
    registered_families,
)
from megatron_solopo.model.families.llama import llama_weight_table
from megatron_solopo.model.hf.config import UnsupportedHFConfig, hf_config_from_preset, infer_preset_from_hf
from megatron_solopo.model.presets import ARCHITECTURES, ModelPreset, get_preset, list_presets

PACKAGE = pathlib.Path(__file__).parents[2] / "megatron_solopo"


def test_architectures_are_the_registered_families():
    assert ARCHITECTURES == family_names() == ("llama", "qwen2", "mistral")
    assert {get_preset(name).architecture for name in list_presets()} <= set(family_names())
    for fam in registered_families():  # each family's module holds exactly its description
        module = importlib.import_module(f"megatron_solopo.model.families.{fam.name}")
        assert getattr(module, fam.name.upper()) is fam


def test_family_quirks_are_data():
    qwen2, mistral, llama = get_family("qwen2"), get_family("mistral"), get_family("llama")
    assert qwen2.qkv_bias and not llama.qkv_bias and not mistral.qkv_bias
    assert qwen2.sliding_window.is_on({"use_sliding_window": True})
    assert not qwen2.sliding_window.is_on({"use_sliding_window": False, "sliding_window": 32768})
    assert mistral.sliding_window.is_on({"sliding_window": 4096})
    assert not mistral.sliding_window.is_on({"sliding_window": None}) and llama.sliding_window is None


def test_qkv_bias_must_match_the_table():
    with pytest.raises(ValueError, match="lacks the linear_qkv.bias"):
        ArchitectureFamily("x", "XForCausalLM", "x", llama_weight_table(), qkv_bias=True)


def test_unknown_architecture_names_the_families():
    with pytest.raises(ValueError, match="not in .*llama.*one module per family"):
        ModelPreset("p", "gemma", num_layers=1, hidden_size=8, ffn_hidden_size=8, num_attention_heads=2,
                    num_query_groups=1, vocab_size=8, max_position_embeddings=8)
    with pytest.raises(ValueError, match="no model family 'gemma'"):
        get_family("gemma")


@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry as it is, restored after the test."""
    monkeypatch.setattr(family, "_FAMILIES", dict(family._FAMILIES))


def test_a_new_family_is_one_registration(scratch_registry):
    # what a new module under model/families/ does: presets, config.json reading and writing follow
    family.register_family(ArchitectureFamily(
        "toy", "ToyForCausalLM", "toy", llama_weight_table(qkv_bias=True), qkv_bias=True,
        sliding_window=WindowSwitch("use_window", off=False), hf_config_defaults={"use_window": False}))
    preset = ModelPreset("toy-tiny", "toy", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                         num_attention_heads=4, num_query_groups=2, vocab_size=256,
                         max_position_embeddings=4096, qkv_bias=True)
    config = hf_config_from_preset(preset)
    assert config["architectures"] == ["ToyForCausalLM"] and config["use_window"] is False
    assert infer_preset_from_hf(config, name="toy-tiny") == preset
    with pytest.raises(UnsupportedHFConfig, match="use_window=true turns on sliding-window attention"):
        infer_preset_from_hf({**config, "use_window": True})
    with pytest.raises(ValueError, match="already registered"):
        family.register_family(ArchitectureFamily("toy2", "ToyForCausalLM", "toy2", llama_weight_table()))


def _imported_modules(path: pathlib.Path, top_level_only: bool = False) -> set[str]:
    """Every module a file imports: at the top only, or also inside functions and `if` blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("room", ["checkpoint", "model"])
def test_lower_rooms_never_import_convert(room):
    offenders = {str(path.relative_to(PACKAGE)): sorted(m for m in _imported_modules(path)
                                                        if m.startswith("megatron_solopo.convert"))
                 for path in sorted((PACKAGE / room).rglob("*.py"))}
    assert not {path: modules for path, modules in offenders.items() if modules}


def test_families_import_no_torch_and_nothing_else_of_the_package():
    # model/presets.py reads the registry: importing it must stay as cheap as reading a config
    for path in sorted((PACKAGE / "model" / "families").glob("*.py")):
        imported = _imported_modules(path, top_level_only=True)
        outside = {m for m in imported if m.startswith("megatron_solopo.")
                   and not m.startswith("megatron_solopo.model.families")}
        assert "torch" not in imported and not outside, (path.name, outside)
