"""Mistral (`MistralForCausalLM`): Mistral-7B v0.2/v0.3.

Llama's layout and config. v0.1 attends within a 4096-token sliding window (`sliding_window: 4096`),
which Megatron's GPT block cannot compute; v0.2+ checkpoints have `sliding_window: null`.
"""

from __future__ import annotations

from megatron_solopo.model.families.family import ArchitectureFamily, WindowSwitch, register_family
from megatron_solopo.model.families.llama import llama_weight_table

MISTRAL = register_family(ArchitectureFamily(
    name="mistral",
    hf_architecture="MistralForCausalLM",
    model_type="mistral",
    weights=llama_weight_table(),
    sliding_window=WindowSwitch("sliding_window", off=None,
                                note="Mistral v0.2+ checkpoints have sliding_window null"),
    hf_config_defaults={"attention_bias": False, "sliding_window": None},
))
