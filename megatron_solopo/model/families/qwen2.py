"""Qwen2 (`Qwen2ForCausalLM`): Qwen2, Qwen2.5.

Llama's layout plus a bias on q/k/v (none on o_proj or the MLP). Tied embeddings (Qwen2.5-0.5B/1.5B/3B)
are common. The published configs carry a `sliding_window` size that `use_sliding_window: false`
leaves unused; with the switch on the model is refused.
"""

from __future__ import annotations

from megatron_solopo.model.families.family import ArchitectureFamily, WindowSwitch, register_family
from megatron_solopo.model.families.llama import llama_weight_table

QWEN2 = register_family(ArchitectureFamily(
    name="qwen2",
    hf_architecture="Qwen2ForCausalLM",
    model_type="qwen2",
    weights=llama_weight_table(qkv_bias=True),
    qkv_bias=True,
    sliding_window=WindowSwitch("use_sliding_window", off=False, size_key="sliding_window"),
    hf_config_defaults={"sliding_window": None, "use_sliding_window": False},
))
