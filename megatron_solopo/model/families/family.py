"""`ArchitectureFamily`: everything the project knows about one HF model family, and their registry.

A family is one Hugging Face architecture that Megatron's GPT block (RMSNorm, SwiGLU, RoPE, GQA)
computes exactly: its names in config.json, the config.json keys where it differs from the common
Llama layout (as data: a QKV bias, the key that switches on a sliding window, the keys a generated
config.json carries), and its weight table. One module per family under model/families/ builds the
description and registers it; presets (`ModelPreset.architecture`), the config.json reader
(model/hf/config.py), the weight loader (model/hf/loading.py) and the export (convert/) all look
the family up here, so nothing else branches on a family's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from megatron_solopo.model.families.tables import WeightTable


@dataclasses.dataclass(frozen=True)
class WindowSwitch:
    """The config.json key that turns sliding-window attention on. Megatron's GPT block has full
    attention only, so a config with the window on is refused (the model would differ beyond it)."""

    key: str
    """e.g. Qwen2's `use_sliding_window`, Mistral's `sliding_window`."""
    off: Any
    """The value that means full attention (false, or null); null (an absent key) is always off."""
    size_key: str | None = None
    """The key holding the window size, when `key` is only a switch (named in the error)."""
    note: str = ""
    """Said in the error after 'only full attention is supported', e.g. which checkpoints have it off."""

    def is_on(self, config: Mapping[str, Any]) -> bool:
        value = config.get(self.key)
        return value is not None and value != self.off


@dataclasses.dataclass(frozen=True)
class ArchitectureFamily:
    """One HF model family: how to recognize it, how its config.json differs, and its weight table."""

    name: str
    """The preset architecture (`ModelPreset.architecture`), e.g. 'llama'."""
    hf_architecture: str
    """`architectures[0]` in config.json, e.g. 'LlamaForCausalLM'."""
    model_type: str
    """`model_type` in config.json (read when `architectures` is absent)."""
    weights: WeightTable
    """HF tensor names <-> Megatron tensor names, with their TP splits."""
    qkv_bias: bool = False
    """The attention has q/k/v biases and no others (Qwen2): presets of this family set qkv_bias. Without
    it, `attention_bias: true` in config.json is refused (Megatron's switch would bias o_proj too)."""
    sliding_window: WindowSwitch | None = None
    """The family's own sliding-window switch in config.json (`layer_types` is checked for every family)."""
    hf_config_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Keys a generated config.json carries beyond the common ones, each saying 'off' (no bias, full
    attention), so transformers' own defaults for this family never apply."""

    def __post_init__(self) -> None:
        if self.qkv_bias != any(m.mcore.endswith("linear_qkv.bias") for m in self.weights.layer_mappings):
            raise ValueError(f"family {self.name}: qkv_bias={self.qkv_bias} but its weight table "
                             f"{'lacks' if self.qkv_bias else 'has'} the linear_qkv.bias entry")


_FAMILIES: dict[str, ArchitectureFamily] = {}


def register_family(family: ArchitectureFamily) -> ArchitectureFamily:
    """Adds a family to the registry (names, HF class names and model types are unique); returns it."""
    for other in _FAMILIES.values():
        clash = [field for field in ("name", "hf_architecture", "model_type")
                 if getattr(other, field) == getattr(family, field)]
        if clash:
            raise ValueError(f"family {family.name!r}: {clash[0]} {getattr(family, clash[0])!r} is already "
                             f"registered by {other.name!r}")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> ArchitectureFamily:
    """The registered family `name` (a preset's architecture); the error lists the known ones."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"no model family {name!r}; supported: {', '.join(_FAMILIES)} "
                         "(docs/conversion.md: adding a family)") from None


def family_names() -> tuple[str, ...]:
    """Registered family names, in registration order."""
    return tuple(_FAMILIES)


def registered_families() -> tuple[ArchitectureFamily, ...]:
    """Every registered family, in registration order."""
    return tuple(_FAMILIES.values())
