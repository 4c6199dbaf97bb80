"""Single-process checks of SDPACoreAttention, the ring kernels at CP=1 and the CP shard helpers.

References are naive float64 masked softmax attention written out here (scores, mask, softmax,
weighted sum), independent of the code under test.
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import _get_thd_freqs_on_this_cp_rank
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_solopo.model.attention import SDPACoreAttention, ring_attention
from megatron_solopo.parallel.cp import (
    cp_shard,
    cp_shard_thd,
    cp_unshard,
    cp_unshard_thd,
    thd_zigzag_token_indices,
    zigzag_token_indices,
)


def naive_attention(q, k, v, allowed):
    """q [s, b, h, d], k/v [s, b, hkv, d], allowed [sq, sk] or [b, 1, sq, sk] bool -> [s, b, h*d] (fp64)."""
    q, k, v = (x.double() for x in (q, k, v))
    groups = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bhqk,kbhd->qbhd", torch.softmax(scores, dim=-1), v)
    return out.reshape(q.size(0), q.size(1), -1)


def make_qkv(seq, batch, heads, kv_heads, head_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(seq, batch, heads, head_dim, generator=gen)
    k = torch.randn(seq, batch, kv_heads, head_dim, generator=gen)
    v = torch.randn(seq, batch, kv_heads, head_dim, generator=gen)
    return [x.requires_grad_() for x in (q, k, v)]


def core_attention(heads, kv_heads, head_dim, mask_type=AttnMaskType.causal, **config_overrides):
    config = TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                               num_query_groups=kv_heads, kv_channels=head_dim, attention_dropout=0.0,
                               **config_overrides)
    return SDPACoreAttention(config=config, layer_number=1, attn_mask_type=mask_type, attention_type="self",
                             cp_comm_type=None, softmax_scale=None, pg_collection=None)


def grads(out, inputs, seed=1):
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad(out, inputs, grad_out)


def assert_matches(out, ref, inputs, atol=2e-5):
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=1e-4)
    for got, want in zip(grads(out, inputs), grads(ref, inputs)):
        torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=1e-4)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (4, 2, 24), (6, 2, 40), (3, 1, 8)])
def test_sbhd_causal_matches_naive(heads, kv_heads, head_dim):
    q, k, v = make_qkv(12, 2, heads, kv_heads, head_dim)
    out = core_attention(heads, kv_heads, head_dim)(q, k, v, None)
    assert out.shape == (12, 2, heads * head_dim)
    assert_matches(out, naive_attention(q, k, v, torch.ones(12, 12, dtype=torch.bool).tril()), (q, k, v))


def test_sbhd_explicit_mask_is_combined_with_causality_and_padding_type_is_full():
    q, k, v = make_qkv(10, 2, 4, 2, 24)
    padding = torch.zeros(2, 1, 10, 10, dtype=torch.bool)
    padding[1, :, :, 7:] = True  # second sample: keys 7.. are padding (True = masked)
    causal_allowed = torch.ones(10, 10, dtype=torch.bool).tril() & ~padding
    out = core_attention(4, 2, 24)(q, k, v, padding)
    assert_matches(out, naive_attention(q, k, v, causal_allowed), (q, k, v))
    full = core_attention(4, 2, 24, mask_type=AttnMaskType.no_mask)(q, k, v, None)
    assert_matches(full, naive_attention(q, k, v, torch.ones(10, 10, dtype=torch.bool)), (q, k, v))
    padded = core_attention(4, 2, 24, mask_type=AttnMaskType.padding)(q, k, v, padding)
    assert_matches(padded, naive_attention(q, k, v, ~padding), (q, k, v))


def test_attention_bias_is_added_to_scores():
    q, k, v = make_qkv(6, 1, 2, 2, 8)
    bias = torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(3))
    out = core_attention(2, 2, 8, mask_type=AttnMaskType.no_mask)(q, k, v, None, attention_bias=bias)
    scores = torch.einsum("qbhd,kbhd->bhqk", q.double(), k.double()) / math.sqrt(8) + bias.double()
    ref = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v.double()).reshape(6, 1, 16)
    assert_matches(out, ref, (q, k, v))


def packed_reference(q, k, v, real_lens, padded_lens, causal=True):
    """Block-diagonal (per packed sequence) naive attention; padding rows are zero. q [t, h, d]."""
    total = sum(padded_lens)
    allowed = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for real, padded in zip(real_lens, padded_lens):
        block = torch.ones(real, real, dtype=torch.bool)
        allowed[start:start + real, start:start + real] = block.tril() if causal else block
        start += padded
    rows_with_keys = allowed.any(-1)
    allowed[~rows_with_keys, 0] = True  # keep softmax finite on padding rows, zeroed below
    ref = naive_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), allowed)
    return ref * rows_with_keys[:, None, None].double()


def packed_params(real_lens, padded_lens):
    """TE/Megatron convention: cu_seqlens_q = cumulative REAL lengths (no gaps); where each sequence
    starts in the tensor comes from cu_seqlens_q_padded."""
    cu_real = torch.tensor([0] + real_lens).cumsum(0).int()
    cu_padded = torch.tensor([0] + padded_lens).cumsum(0).int()
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_real, cu_seqlens_kv=cu_real,
                           cu_seqlens_q_padded=cu_padded, cu_seqlens_kv_padded=cu_padded,
                           max_seqlen_q=max(padded_lens), max_seqlen_kv=max(padded_lens))


@pytest.mark.parametrize("causal", [True, False])
def test_thd_packed_matches_block_diagonal_reference(causal):
    real_lens, padded_lens = [5, 9, 3], [8, 9, 4]
    total = sum(padded_lens)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(total, 6, 40, generator=gen).requires_grad_()
    k = torch.randn(total, 2, 40, generator=gen).requires_grad_()
    v = torch.randn(total, 2, 40, generator=gen).requires_grad_()
    mask_type = AttnMaskType.padding_causal if causal else AttnMaskType.padding
    module = core_attention(6, 2, 40, mask_type=mask_type)
    params = packed_params(real_lens, padded_lens)
    out = module(q, k, v, None, packed_seq_params=params)
    assert out.shape == (total, 1, 6 * 40)
    ref = packed_reference(q, k, v, real_lens, padded_lens, causal=causal).reshape(total, 1, -1)
    assert_matches(out, ref, (q, k, v))
    # Megatron may also hand over [t, 1, h, d]
    out4 = module(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), None, packed_seq_params=params)
    torch.testing.assert_close(out4, out)


def test_thd_without_padding_tensors_and_trailing_tokens():
    real_lens = [4, 6]
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(12, 2, 16, generator=gen).requires_grad_() for _ in range(3))  # 2 trailing tokens
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=6, max_seqlen_kv=6)
    out = core_attention(2, 2, 16, mask_type=AttnMaskType.padding_causal)(q, k, v, None, packed_seq_params=params)
    ref = packed_reference(q, k, v, real_lens + [0], real_lens + [2]).reshape(12, 1, -1)
    assert_matches(out, ref, (q, k, v))


def test_gqa_passes_unexpanded_kv_to_sdpa(monkeypatch):
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.size(1), k.size(1), kwargs.get("enable_gqa")))
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v = make_qkv(8, 1, 8, 2, 16)
    core_attention(8, 2, 16)(q, k, v, None)
    assert seen == [(8, 2, True)]


@pytest.mark.parametrize("kernel", ["math", "cpu_flash"])
def test_ring_kernels_at_cp1_sbhd_and_packed(kernel):
    q, k, v = make_qkv(16, 2, 6, 2, 40, seed=7)
    out = ring_attention(q, k, v, None, causal=True, block_kernel=kernel)
    ref = naive_attention(q, k, v, torch.ones(16, 16, dtype=torch.bool).tril())
    assert_matches(out.reshape(16, 2, -1), ref, (q, k, v))
    # packed: two sequences, each attends only within itself
    cu = torch.tensor([0, 6, 16])
    out = ring_attention(q[:, :1], k[:, :1], v[:, :1], None, causal=True, cu_seqlens_padded=cu, block_kernel=kernel)
    ref = packed_reference(q[:, 0], k[:, 0], v[:, 0], [6, 10], [6, 10])
    assert_matches(out.reshape(16, 1, -1), ref.reshape(16, 1, -1), (q, k, v))


def test_cp_shard_layout_by_hand_and_round_trip():
    tokens = torch.arange(16).unsqueeze(0)  # [b=1, s=16]
    # cp=2: 4 chunks of 4 tokens; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert cp_shard(tokens, 1, 0, 2).tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert cp_shard(tokens, 1, 1, 2).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    # cp=4: 8 chunks of 2; rank 1 holds chunks 1 and 6
    assert cp_shard(tokens, 1, 1, 4).tolist() == [[2, 3, 12, 13]]
    assert zigzag_token_indices(16, 1, 4).tolist() == [2, 3, 12, 13]
    x = torch.randn(24, 3, 2)
    for cp in (1, 2, 3, 4, 6):
        torch.testing.assert_close(cp_unshard([cp_shard(x, 0, r, cp) for r in range(cp)], 0), x)
    with pytest.raises(ValueError, match="multiple of 2\\*cp"):
        cp_shard(torch.zeros(1, 10), 1, 0, 3)


def test_thd_shard_matches_megatron_rope_layout_and_round_trip():
    cu = [0, 8, 24, 32]  # three packed sequences of 8, 16 and 8 tokens, cp=2 (multiples of 4)
    positions = torch.arange(32)
    for cp in (2, 4):
        for rank in range(cp):
            ours = cp_shard_thd(positions, cu, 0, rank, cp)
            # Megatron's THD RoPE picks each sequence's local positions with this helper
            megatron = torch.cat([
                _get_thd_freqs_on_this_cp_rank(rank, cp, torch.empty((end - start) // cp), positions, start)
                for start, end in zip(cu[:-1], cu[1:])])
            assert ours.tolist() == megatron.tolist()
            assert thd_zigzag_token_indices(cu, rank, cp).tolist() == ours.tolist()
        x = torch.randn(2, 32, 3)
        torch.testing.assert_close(cp_unshard_thd([cp_shard_thd(x, cu, 1, r, cp) for r in range(cp)], cu, 1), x)
    with pytest.raises(ValueError, match="packed sequence 1"):
        cp_shard_thd(positions[:30], [0, 8, 30], 0, 0, 2)


def test_unsupported_settings_fail_loudly():
    with pytest.raises(ValueError, match="window_size"):
        core_attention(2, 2, 8, window_size=(4, 0))
    with pytest.raises(ValueError, match="context_parallel_size=2"):
        core_attention(2, 2, 8, context_parallel_size=2)  # no CP process group of that size
    q, k, v = make_qkv(4, 1, 2, 2, 8)
    with pytest.raises(ValueError, match="equal query/key lengths"):
        core_attention(2, 2, 8)(q, k[:3], v[:3], None)
    with pytest.raises(ValueError, match="qkv_format"):
        core_attention(2, 2, 8)(q, k, v, None, packed_seq_params=SimpleNamespace(qkv_format="sbhd"))
