"""Model FLOPs of a training pass (plan/flops.py: what `solopo bench` reports and `solopo plan --gpus`
projects from), by hand on the tiny preset and against the parameter count."""

from megatron_solopo.model.presets import get_preset
from megatron_solopo.plan.flops import attention_flops, linear_flops_per_token, lm_head_flops, sequence_train_flops


def test_flops_tiny_preset_by_hand():
    # tiny: h=64, f=128, heads 4, kv heads 2, d=16, 2 layers, vocab 256
    p = get_preset("tiny")
    # per layer: qkv 64*16*(4+2*2)=8192, proj 4*16*64=4096, mlp 3*64*128=24576 -> 36864 MACs
    assert linear_flops_per_token(p) == 2 * 36864 * 2
    # causal attention, s=128: per layer and head QK^T + PV = 2 * 2*s*s*d, halved by the mask
    assert attention_flops(p, 128) == 2 * 2 * 128 * 128 * 16 // 2 * 4 * 2
    assert lm_head_flops(p, 16) == 2 * 64 * 256 * 16
    forward = 128 * 147456 + 4194304 + 524288
    assert sequence_train_flops(p, 128, 16) == 3 * forward == 70778880


def test_linear_flops_match_parameter_count():
    # the 6N rule's N: matmul weights = all parameters minus embeddings and norm weights
    for name in ("llama-1b", "smollm2-135m"):
        p = get_preset(name)
        embeddings = p.vocab_size * p.hidden_size * (1 if p.tie_embeddings else 2)
        norms = p.num_layers * 2 * p.hidden_size + p.hidden_size
        assert linear_flops_per_token(p) == 2 * (p.num_parameters() - embeddings - norms)


def test_attention_flops_quadratic():
    p = get_preset("llama-1b")
    assert attention_flops(p, 16384) == 4 * attention_flops(p, 8192)
    # at 32K the 1.1B model spends more forward FLOPs in attention than in its matmuls:
    # 2*s*nq*d*layers = 2*32768*2048*22 vs 2*(~0.97e9) per token
    assert attention_flops(p, 32768) > 32768 * linear_flops_per_token(p)
