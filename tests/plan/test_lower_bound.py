"""The analytic per-GPU memory lower bound (plan/lower_bound.py) against hand-derived values: parameters per
GPU, saved activations per token and layer, bytes per parameter of Megatron's mixed precision, CP and packing."""

import pytest

from megatron_solopo.model.presets import ModelPreset, get_preset
from megatron_solopo.parallel.config import ParallelConfig
from megatron_solopo.plan.lower_bound import (
    GIB,
    SequencePlan,
    activation_bytes_per_token_per_layer,
    memory_lower_bound,
    params_per_gpu,
)

TOY = ModelPreset("toy", "llama", num_layers=4, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2,
                  num_query_groups=1, vocab_size=32, max_position_embeddings=64)


def test_params_per_gpu_hand_counted():
    # per layer: qkv 8*4*(2+2)=128, proj 2*4*8=64, mlp 3*8*16=384 (split by TP) + norms 16 (replicated)
    assert params_per_gpu(TOY, ParallelConfig()) == 4 * (576 + 16) + 2 * 32 * 8 + 8 == TOY.num_parameters()
    assert params_per_gpu(TOY, ParallelConfig(tp=2)) == 4 * (288 + 16) + 2 * 16 * 8 + 8
    # pp=2: first stage 2 layers + embedding; last stage 2 layers + output layer + final norm (larger)
    assert params_per_gpu(TOY, ParallelConfig(pp=2)) == 2 * (576 + 16) + 32 * 8 + 8
    tied = TOY.replace(tie_embeddings=True)
    assert params_per_gpu(tied, ParallelConfig()) == tied.num_parameters()


def test_activation_bytes_hand_derived():
    # bf16: 2 * [4h + (2*a*d + 2*g*d + 3f)] = 2 * [32 + (16 + 8 + 48)] = 208 bytes per token per layer
    assert activation_bytes_per_token_per_layer(TOY, ParallelConfig(), 2, "none") == 208
    # tp=2 without SP: the 4h stays, the rest halves; with SP everything halves
    assert activation_bytes_per_token_per_layer(TOY, ParallelConfig(tp=2), 2, "none") == 2 * (32 + 36)
    assert activation_bytes_per_token_per_layer(TOY, ParallelConfig(tp=2, sequence_parallel=True), 2,
                                                "none") == 104
    assert activation_bytes_per_token_per_layer(TOY, ParallelConfig(), 2, "full") == 16  # the layer input


def test_bytes_per_parameter_match_megatron_mixed_precision():
    preset = get_preset("llama3.1-8b")
    seqs = SequencePlan(("short_chosen",), (1024,), 128)
    plain = memory_lower_bound(preset, ParallelConfig(tp=8), 8, seqs, micro_batch_pairs=1, num_microbatches=1,
                               distributed_optimizer=False)
    params = plain.params_per_gpu
    # 2 (bf16 weights) + 4 (fp32 grads) + 12 (fp32 master, Adam m, v) = 18 bytes per parameter
    assert plain.weights + plain.gradients + plain.optimizer == 18 * params
    sharded = memory_lower_bound(preset, ParallelConfig(tp=2, cp=2), 16, seqs, micro_batch_pairs=1,
                                 num_microbatches=1, distributed_optimizer=True)
    # dp = 16 / (2*2) = 4; optimizer shards over dp*cp = 8: 6 + 12/8 bytes per parameter
    assert sharded.weights + sharded.gradients + sharded.optimizer == pytest.approx(7.5 * sharded.params_per_gpu)
    # CP halves the tokens per GPU and hence the activations (same tp)
    cp1 = memory_lower_bound(preset, ParallelConfig(tp=2), 8, seqs, micro_batch_pairs=1, num_microbatches=1)
    cp2 = memory_lower_bound(preset, ParallelConfig(tp=2, cp=2), 8, seqs, micro_batch_pairs=1, num_microbatches=1)
    assert cp2.activations == pytest.approx(cp1.activations / 2)
    assert cp1.total < 80 * GIB


def test_solo_needs_less_activation_memory_than_long_at_the_same_length():
    preset = get_preset("llama3.1-8b")
    long_len, short_len, resp = 65536, 2048, 512
    solo = SequencePlan(("short_chosen", "short_rejected", "long_chosen"), (short_len, short_len, long_len), resp)
    long = SequencePlan(("long_chosen", "long_rejected"), (long_len, long_len), resp)
    args = {"micro_batch_pairs": 1, "num_microbatches": 8}
    a = memory_lower_bound(preset, ParallelConfig(tp=8), 8, solo, **args)
    b = memory_lower_bound(preset, ParallelConfig(tp=8), 8, long, **args)
    # packed tokens: (2*2048 + 65536) / (2*65536) of long-X's
    assert a.activations / b.activations == pytest.approx((2 * short_len + long_len) / (2 * long_len))
    padded = memory_lower_bound(preset, ParallelConfig(tp=8), 8, solo, packed=False, **args)
    assert padded.tokens_per_microbatch_per_gpu == 3 * long_len  # padding wastes what packing saves
