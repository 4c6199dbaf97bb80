"""The one place that turns a preset + parallel layout into Megatron-Core GPTModel chunks.

GPTModel is deprecated in Megatron-Core 0.19 in favour of HybridModel (TE-only stack spec); dense
Llama/Qwen still build as GPTModel in Megatron-Bridge and NeMo-RL. Keeping construction here makes
the switch a local change.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from megatron_solopo.model.attention import SDPACoreAttention
from megatron_solopo.model.backends import check_fp8_recipe, resolve_attention_backend
from megatron_solopo.model.config import ModelConfig
from megatron_solopo.model.presets import ModelPreset
from megatron_solopo.parallel.config import ParallelConfig
from megatron_solopo.parallel.parallel_context import ParallelContext, as_parallel_context
from megatron_solopo.parallel.device import cuda_in_use

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _silence_gpt_deprecation() -> None:
    # GPTModel logs a deprecation warning per construction; one line in the docs says why we keep it
    logging.getLogger("megatron.core.models.gpt.gpt_model").setLevel(logging.ERROR)


def transformer_config(preset: ModelPreset, parallel: ParallelConfig, model: ModelConfig,
                       backend: str, initialize_weights: bool = True):
    """Megatron TransformerConfig for a Llama-style block (RMSNorm, SwiGLU, RoPE, GQA, no biases)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = _DTYPES[model.params_dtype]
    recompute = {}
    if model.recompute == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif model.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=model.recompute_num_layers)
    fp8 = {}
    if model.fp8 is not None:
        fp8 = dict(fp8=model.fp8, fp8_recipe=model.fp8_recipe)
    return TransformerConfig(
        num_layers=preset.num_layers,
        hidden_size=preset.hidden_size,
        ffn_hidden_size=preset.ffn_hidden_size,
        num_attention_heads=preset.num_attention_heads,
        num_query_groups=preset.num_query_groups,
        kv_channels=preset.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=preset.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=preset.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.virtual_pp,
        context_parallel_size=parallel.cp,
        cp_comm_type=parallel.cp_comm_type,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        # the same master weights are drawn on every layout and then split: TP/PP-invariant init
        use_cpu_initialization=True,
        perform_initialization=initialize_weights,
        init_method_std=0.02,
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # dense model; the default allgather rejects variable lengths
        # fused kernels need apex / TE / CUDA; the TE spec brings its own fusions
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
        **recompute,
        **fp8,
    )


class TorchRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm for the sdpa and local specs, usable with sequence parallelism.

    Megatron's own fallback (WrappedTorchNorm, used without TE or Apex) refuses sequence parallelism:
    under it each TP rank normalizes a different slice of the sequence, so the norm weight's gradient
    is a partial sum. Marking the weight `sequence_parallel` makes Megatron's finalize_model_grads sum
    it over the TP group, which is all that TE's norm does differently. Without sequence parallelism it
    is exactly torch.nn.RMSNorm (same parameter name, same values).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_megatron_norm_options) -> None:
        if config.normalization != "RMSNorm":
            raise ValueError(f"TorchRMSNorm serves RMSNorm models, got normalization={config.normalization!r}")
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def layer_spec(backend: str):
    """Transformer layer spec: TE (fused, FP8, CP via TE), sdpa (our core attention) or local."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if backend == "te":
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = TorchRMSNorm
    if backend == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def block_spec(backend: str, config, vp_stage: int | None, pp_rank: int):
    """What GPTModel builds its decoder from: TE's layer spec, or for sdpa/local the layers of this
    (virtual) stage with TorchRMSNorm as the final norm too (Megatron would pick WrappedTorchNorm)."""
    if backend == "te":
        return layer_spec(backend)
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer_spec(backend)] * layers, layer_norm=TorchRMSNorm)


def build_gpt_model(preset: ModelPreset, parallel: ParallelContext | ParallelConfig | None = None,
                    model: ModelConfig | None = None, vp_stage: int | None = None,
                    initialize_weights: bool = True):
    """One GPTModel chunk for this rank.

    parallel: the ParallelContext from initialize_parallel (its stage decides pre/post-processing, its
    process groups go to GPTModel as its `pg_collection`); a ParallelConfig (or None) stands for the
    current context, which must have its sizes (`parallel.as_parallel_context`).
    With pipeline parallelism the chunk holds this stage's layers; `vp_stage` selects the virtual
    stage of an interleaved pipeline. `initialize_weights=False` skips random initialization (the
    weights are garbage until loaded): for models whose weights come from a checkpoint, where the
    random init of a 7B+ model on the CPU would cost minutes.
    """
    from megatron.core.models.gpt import GPTModel

    context = as_parallel_context(parallel)
    parallel = context.config
    if context.vpp_size > 1 and vp_stage is None:
        raise ValueError(f"parallel.virtual_pp={context.vpp_size}: pass vp_stage (or build all chunks with "
                         "build_model_chunks)")
    model = model or ModelConfig(preset=preset.name)
    parallel.check_model(preset.num_layers, preset.num_attention_heads, preset.num_query_groups,
                         preset.vocab_size)
    backend = resolve_attention_backend(model.attention_backend, model.params_dtype)
    check_fp8_recipe(model.fp8, model.fp8_recipe)  # e.g. mxfp8 on Hopper: refused before any GEMM asserts
    config = transformer_config(preset, parallel, model, backend, initialize_weights)
    _silence_gpt_deprecation()
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(backend, config, vp_stage, context.pp_rank),
        vocab_size=preset.vocab_size,
        max_sequence_length=preset.max_position_embeddings,
        pre_process=context.is_first_stage(vp_stage),
        post_process=context.is_last_stage(vp_stage),
        share_embeddings_and_output_weights=preset.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(preset.rotary_base),
        rope_scaling=preset.rope_scaling_factor is not None,
        rope_scaling_factor=preset.rope_scaling_factor or 8.0,
        parallel_output=True,
        pg_collection=context.pg_collection,  # the context's groups, passed down to the attention
        vp_stage=vp_stage,
    )
    gpt.attention_backend_name = backend
    if cuda_in_use():  # weights are initialized on the CPU (use_cpu_initialization); SOLOPO_DEVICE=cpu keeps them there
        gpt.cuda(torch.cuda.current_device())
    return gpt


def build_model_chunks(preset: ModelPreset, parallel: ParallelContext | ParallelConfig | None = None,
                       model: ModelConfig | None = None, initialize_weights: bool = True) -> list:
    """All model chunks this rank holds: one, or `virtual_pp` for an interleaved pipeline."""
    parallel = as_parallel_context(parallel)
    stages = parallel.vpp_size
    return [build_gpt_model(preset, parallel, model, vp_stage=(i if stages > 1 else None),
                            initialize_weights=initialize_weights)
            for i in range(stages)]
