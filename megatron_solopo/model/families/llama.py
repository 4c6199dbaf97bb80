"""Llama (`LlamaForCausalLM`): Llama-2, Llama-3/3.1/3.2, TinyLlama, SmolLM/SmolLM2.

Its weight names are the layout Qwen2 and Mistral reuse (`llama_weight_table`). Tied embeddings
(SmolLM2, Llama-3.2) and Llama-3.1's 'llama3' RoPE scaling are read by model/hf/config.py for every
family.
"""

from __future__ import annotations

from megatron_solopo.model.families.family import ArchitectureFamily, register_family
from megatron_solopo.model.families.tables import Direct, FusedGateUp, FusedQKV, OutputLayer, WeightTable

_L = "decoder.layers.{layer}."
_H = "model.layers.{layer}."

_GLOBAL = (
    Direct("embedding.word_embeddings.weight", "model.embed_tokens.weight", "column"),
    Direct("decoder.final_layernorm.weight", "model.norm.weight", "none"),
    OutputLayer("output_layer.weight", "lm_head.weight", tied_hf="model.embed_tokens.weight"),
)

_LAYER = (
    Direct(_L + "input_layernorm.weight", _H + "input_layernorm.weight", "none"),
    FusedQKV(_L + "self_attention.linear_qkv.weight", _H + "self_attn.q_proj.weight",
             _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
    Direct(_L + "self_attention.linear_proj.weight", _H + "self_attn.o_proj.weight", "row"),
    Direct(_L + "pre_mlp_layernorm.weight", _H + "post_attention_layernorm.weight", "none"),
    FusedGateUp(_L + "mlp.linear_fc1.weight", _H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
    Direct(_L + "mlp.linear_fc2.weight", _H + "mlp.down_proj.weight", "row"),
)

_QKV_BIAS = FusedQKV(_L + "self_attention.linear_qkv.bias", _H + "self_attn.q_proj.bias",
                     _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias")


def llama_weight_table(qkv_bias: bool = False) -> WeightTable:
    """The Llama names (model.layers.{L}.self_attn.q_proj.weight, ...); with `qkv_bias` also the
    q/k/v biases (Qwen2)."""
    return WeightTable(_GLOBAL, _LAYER + ((_QKV_BIAS,) if qkv_bias else ()))


LLAMA = register_family(ArchitectureFamily(
    name="llama",
    hf_architecture="LlamaForCausalLM",
    model_type="llama",
    weights=llama_weight_table(),
    hf_config_defaults={"attention_bias": False, "mlp_bias": False},
))
