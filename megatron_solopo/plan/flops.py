"""Model FLOPs of a training pass (attention counted) and the MFU denominator: what `solopo bench` reports
(TFLOP/s, MFU) and what `solopo plan --gpus` projects step times from (plan/search.py). Pure arithmetic."""

from __future__ import annotations

H100_BF16_DENSE_PEAK_TFLOPS = 989.0
"""NVIDIA H100 SXM dense BF16 tensor-core peak (no sparsity); the default MFU denominator on CUDA."""


def linear_flops_per_token(preset) -> int:
    """Forward FLOPs of one token through every layer's matmuls (QKV, output projection, SwiGLU MLP).

    2 FLOPs per multiply-add: 2 * (h*d*(nq + 2*nkv) + nq*d*h + 3*h*f) per layer, times the layers.
    Norms, RoPE, activations and softmax are not counted (they are not matmuls).
    """
    h, f, d = preset.hidden_size, preset.ffn_hidden_size, preset.head_dim
    nq, nkv = preset.num_attention_heads, preset.num_query_groups
    per_layer = h * d * (nq + 2 * nkv) + nq * d * h + 3 * h * f
    return 2 * per_layer * preset.num_layers


def attention_flops(preset, seq_len_tokens: int) -> int:
    """Forward FLOPs of causal attention (QK^T and PV) over one sequence, all layers.

    Per layer and query head: QK^T is 2*s*s*d, PV another 2*s*s*d; causal masking keeps half of the
    s*s score matrix, so 2*2*s^2*(nq*d)/2 = 2*s^2*nq*d per layer. GQA does not change it (every
    query head still scores every visible key).
    """
    s, d, nq = seq_len_tokens, preset.head_dim, preset.num_attention_heads
    return 2 * s * s * nq * d * preset.num_layers


def lm_head_flops(preset, positions: int) -> int:
    """Forward FLOPs of the output layer at `positions` positions: 2 * h * vocab each."""
    return 2 * preset.hidden_size * preset.vocab_size * positions


def sequence_train_flops(preset, seq_len_tokens: int, response_tokens: int) -> int:
    """Model FLOPs of one training pass (forward + backward = 3 x forward) over one sequence.

    forward = s * linear_flops_per_token + attention_flops(s) + lm_head_flops(response_tokens):
    the LM head is counted only where the loss needs log-probs (the response positions), for our
    stack and for the baseline alike, so the two share the numerator of TFLOP/s and MFU; the
    baseline's full-vocabulary logits over the context are overhead, not model FLOPs. Recomputed
    activations are not counted either (model FLOPs, not hardware FLOPs).
    """
    forward = (seq_len_tokens * linear_flops_per_token(preset) + attention_flops(preset, seq_len_tokens)
               + lm_head_flops(preset, response_tokens))
    return 3 * forward
