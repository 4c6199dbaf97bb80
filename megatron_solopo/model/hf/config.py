"""A `ModelPreset` from a Hugging Face config.json, and a config.json from a preset.

Only what Megatron's GPT block computes exactly is accepted. Anything it would approximate is an
error that names the field and the way out: sliding-window attention, RoPE scaling other than
Llama-3.1's ('llama3' with Megatron's fixed low_freq_factor=1, high_freq_factor=4,
original_max_position_embeddings=8192), partial rotary embeddings, biases beyond a family's QKV bias,
activations other than SiLU, quantized checkpoints. Both config layouts are read: transformers 4
(`rope_theta`, `rope_scaling`) and transformers 5 (`rope_parameters`, `layer_types`). What differs
between families (QKV bias, the sliding-window switch, the keys of a generated config.json) is read
from their `ArchitectureFamily` (model/families/); nothing here names a family.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from megatron_solopo.console import relative_path_hint
from megatron_solopo.model.families import ArchitectureFamily, get_family, registered_families
from megatron_solopo.model.presets import ModelPreset

# Megatron-Core 0.19 RotaryEmbedding._apply_scaling hard-codes these (Llama-3.1's values); only the
# factor is configurable. A config with other values would silently get different frequencies.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}
_LLAMA3_KEYS = {"rope_type", "type", "rope_theta", "factor", *MEGATRON_LLAMA3_ROPE}
_DEFAULT_ROPE_KEYS = {"rope_type", "type", "rope_theta"}


class UnsupportedHFConfig(ValueError):
    """The HF config describes a model the Megatron preset cannot express exactly."""


def read_hf_config(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """config.json as a dict, from a model directory, a config.json path, or a dict."""
    if isinstance(source, Mapping):
        return dict(source)
    path = pathlib.Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no config.json at {path}: is this a Hugging Face model directory?"
                                + relative_path_hint(path))
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UnsupportedHFConfig(f"{path} is not valid JSON ({err}); fix or re-download it") from None
    if not isinstance(config, dict):
        raise UnsupportedHFConfig(f"{path} holds a JSON {type(config).__name__}, not an object of model settings")
    return config


def family_of_config(config: Mapping[str, Any], where: str = "config.json") -> ArchitectureFamily:
    """The registered family of a config.json: by `architectures`, else (when absent) by `model_type`."""
    families = registered_families()
    archs = config.get("architectures") or []
    for arch in archs:
        for family in families:
            if family.hf_architecture == arch:
                return family
    model_type = config.get("model_type")
    if not archs:  # a config written by hand, or an old one: model_type alone says the family
        for family in families:
            if family.model_type == model_type:
                return family
    supported = ", ".join(sorted(family.hf_architecture for family in families))
    raise UnsupportedHFConfig(
        f"{where}: architecture {archs or model_type!r} is not supported for conversion; supported: "
        f"{supported} (docs/conversion.md explains how to add one)")


def _required(config: Mapping[str, Any], key: str, where: str):
    if config.get(key) is None:
        raise UnsupportedHFConfig(f"{where}: config.json has no {key!r}, which the conversion needs")
    return config[key]


def hf_rope_parameters(config: Mapping[str, Any], where: str = "config.json") -> dict[str, Any]:
    """The RoPE parameters transformers (>= 5) builds from a config.json, resolved the same way.

    transformers lets a non-empty `rope_scaling` (the transformers 4 key) replace `rope_parameters`
    whole, then fills `rope_theta` from the top level (default 10000) and `rope_type` from the legacy
    `type` (default "default"). A file with both keys is therefore read as its `rope_scaling`: reading
    `rope_parameters` first would convert e.g. a YaRN model as plain RoPE. tests/convert compares this
    function with transformers' own resolution.
    """
    chosen = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(chosen, Mapping):
        raise UnsupportedHFConfig(f"{where}: RoPE parameters must be a JSON object, got {chosen!r}")
    resolved = dict(chosen)
    if resolved and all(isinstance(value, Mapping) for value in resolved.values()):
        return resolved  # per layer type: the caller refuses it
    resolved.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    resolved.setdefault("rope_type", resolved.get("type", "default"))
    if config.get("partial_rotary_factor") is not None:
        resolved.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    return resolved


def _rope(config: Mapping[str, Any], where: str) -> tuple[float, float | None]:
    """(rope theta, llama3 scaling factor or None); errors for anything Megatron would approximate."""
    scaling = hf_rope_parameters(config, where)
    if scaling and all(isinstance(value, Mapping) for value in scaling.values()):
        raise UnsupportedHFConfig(f"{where}: per-layer-type RoPE parameters ({sorted(scaling)}) are not "
                                  "supported; one RoPE for all layers is")
    theta = scaling["rope_theta"]
    if not isinstance(theta, (int, float)) or float(theta) != int(theta):
        raise UnsupportedHFConfig(f"{where}: rope_theta={theta} is not an integer; Megatron-Core's "
                                  "RotaryEmbedding takes an integer base")
    partial = scaling.get("partial_rotary_factor", 1.0)
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedHFConfig(f"{where}: partial_rotary_factor={partial} (RoPE on part of each head) "
                                  "is not supported; only full rotary embeddings are")
    rope_type = scaling["rope_type"]
    if rope_type == "default":
        _reject_extra_keys(scaling, _DEFAULT_ROPE_KEYS | {"partial_rotary_factor"}, "default", where)
        return float(theta), None
    if rope_type != "llama3":
        raise UnsupportedHFConfig(
            f"{where}: rope scaling type {rope_type!r} is not implemented by Megatron-Core's GPT model "
            "(only 'llama3', Llama-3.1's frequency scaling, is); converting would change the model")
    _reject_extra_keys(scaling, _LLAMA3_KEYS | {"partial_rotary_factor"}, "llama3", where)
    for key, megatron_value in MEGATRON_LLAMA3_ROPE.items():
        value = scaling.get(key)
        if value is None or float(value) != megatron_value:
            raise UnsupportedHFConfig(
                f"{where}: llama3 rope scaling with {key}={value}; Megatron-Core fixes {key}="
                f"{megatron_value:g} (Llama-3.1/3.2 values), so this model's RoPE frequencies cannot be "
                "reproduced exactly")
    factor = scaling.get("factor")
    if factor is None or float(factor) <= 0:
        raise UnsupportedHFConfig(f"{where}: llama3 rope scaling needs a positive 'factor', got {factor}")
    return float(theta), float(factor)


def _reject_extra_keys(scaling: Mapping[str, Any], allowed: set[str], rope_type: str, where: str) -> None:
    extra = sorted(k for k, v in scaling.items() if k not in allowed and v is not None)
    if extra:
        raise UnsupportedHFConfig(f"{where}: {rope_type} RoPE with extra parameters {extra} is not "
                                  "supported (Megatron-Core would ignore them)")


def _check_full_attention(config: Mapping[str, Any], family: ArchitectureFamily, where: str) -> None:
    layer_types = config.get("layer_types") or []
    windowed = sorted({t for t in layer_types if t != "full_attention"})
    if windowed:
        raise UnsupportedHFConfig(f"{where}: layer types {windowed} in use; only full attention is "
                                  "supported (Megatron's GPT block has no sliding window)")
    switch = family.sliding_window
    if switch is not None and switch.is_on(config):
        size = f" (window {config.get(switch.size_key)})" if switch.size_key else ""
        note = f" ({switch.note})" if switch.note else ""
        raise UnsupportedHFConfig(
            f"{where}: {switch.key}={json.dumps(config[switch.key], default=str)}{size} turns on sliding-window attention; "
            f"only full attention is supported{note}. Set {switch.key} to {json.dumps(switch.off)} in "
            "config.json only if you accept a different model beyond the window")


def _check_biases_and_activation(config: Mapping[str, Any], family: ArchitectureFamily, where: str) -> None:
    if not family.qkv_bias and config.get("attention_bias"):
        with_bias = ", ".join(f.hf_architecture for f in registered_families() if f.qkv_bias)
        raise UnsupportedHFConfig(f"{where}: attention_bias=true (biases on q/k/v/o projections) is not "
                                  f"supported; Megatron's preset has a QKV bias only for {with_bias}")
    if config.get("mlp_bias"):
        raise UnsupportedHFConfig(f"{where}: mlp_bias=true is not supported (the MLP has no biases)")
    act = config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedHFConfig(f"{where}: hidden_act={act!r}; only SiLU (SwiGLU MLP) is supported")
    if config.get("quantization_config"):
        raise UnsupportedHFConfig(f"{where}: quantized checkpoint "
                                  f"({config['quantization_config'].get('quant_method', '?')}); "
                                  "de-quantize it to bf16/fp32 safetensors first")


def infer_preset_from_hf(source: str | os.PathLike | Mapping[str, Any], name: str | None = None) -> ModelPreset:
    """The `ModelPreset` of a HF checkpoint of a registered family (Llama / Qwen2 / Mistral): a directory,
    a config.json path or its dict.

    The preset is returned unregistered, named `name` or 'hf:<directory name>'. Raises
    `UnsupportedHFConfig` (a ValueError) for a model the preset cannot express exactly.
    """
    config = read_hf_config(source)
    if name is None:
        base = pathlib.Path(source).name if not isinstance(source, Mapping) else "config"
        base = "model" if base == "config.json" else base
        name = f"hf:{base}"
    if isinstance(source, Mapping):
        where = f"HF config for {name}"
    else:
        where = str(pathlib.Path(source) / "config.json" if pathlib.Path(source).is_dir() else source)
    try:
        return _preset_from_config(config, name, where)
    except UnsupportedHFConfig:
        raise
    except (TypeError, ValueError) as err:  # a field of the wrong type ("four" heads, a list for a size)
        raise UnsupportedHFConfig(f"{where}: a field has the wrong type or value ({err}); fix config.json") from None


def _preset_from_config(config: Mapping[str, Any], name: str, where: str) -> ModelPreset:
    family = family_of_config(config, where)
    _check_full_attention(config, family, where)
    _check_biases_and_activation(config, family, where)
    theta, rope_factor = _rope(config, where)
    hidden = int(_required(config, "hidden_size", where))
    heads = int(_required(config, "num_attention_heads", where))
    head_dim = config.get("head_dim")
    kv_channels = int(head_dim) if head_dim and (hidden % heads or int(head_dim) != hidden // heads) else None
    return ModelPreset(
        name=name,
        architecture=family.name,
        num_layers=int(_required(config, "num_hidden_layers", where)),
        hidden_size=hidden,
        ffn_hidden_size=int(_required(config, "intermediate_size", where)),
        num_attention_heads=heads,
        num_query_groups=int(config.get("num_key_value_heads") or heads),
        vocab_size=int(_required(config, "vocab_size", where)),
        max_position_embeddings=int(_required(config, "max_position_embeddings", where)),
        rotary_base=theta,
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=family.qkv_bias,
        kv_channels=kv_channels,
        rope_scaling_factor=rope_factor,
    )


TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def hf_config_from_preset(preset: ModelPreset, dtype: str = "bf16") -> dict[str, Any]:
    """A config.json dict (transformers 4 layout, which transformers 5 also reads) for a preset."""
    family = get_family(preset.architecture)
    config: dict[str, Any] = {
        "architectures": [family.hf_architecture],
        "model_type": family.model_type,
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.ffn_hidden_size,
        "num_hidden_layers": preset.num_layers,
        "num_attention_heads": preset.num_attention_heads,
        "num_key_value_heads": preset.num_query_groups,
        "head_dim": preset.head_dim,
        "vocab_size": preset.vocab_size,
        "max_position_embeddings": preset.max_position_embeddings,
        "rms_norm_eps": preset.norm_epsilon,
        "rope_theta": preset.rotary_base,
        "rope_scaling": None,
        "tie_word_embeddings": preset.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": TORCH_DTYPE_NAMES[dtype],
    }
    if preset.rope_scaling_factor is not None:
        config["rope_scaling"] = {"rope_type": "llama3", "factor": preset.rope_scaling_factor,
                                  **MEGATRON_LLAMA3_ROPE}
    config.update(family.hf_config_defaults)
    return config
