"""GPU checks of the attention paths (opt-in: `pytest -m gpu --run-gpu`, skipped without CUDA).

- the CUDA flash block kernel of ring_attention (bf16) against float64 naive attention, at CP=1
  (one process: the ring degenerates to its diagonal step, which exercises the kernel's forward
  and backward with the global output / lse), unpacked and packed;
- SDPACoreAttention on CUDA in bf16, causal GQA and THD;
- the same GPTModel weights give the same loss through the TE spec and the sdpa spec.
"""

import math

import pytest
import torch
from test_attention_core import naive_attention, packed_reference

pytestmark = pytest.mark.gpu

BF16_TOL = dict(atol=3e-2, rtol=3e-2)


def _qkv(seq, batch, heads, kv_heads, head_dim, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shapes = ((seq, batch, heads, head_dim), (seq, batch, kv_heads, head_dim), (seq, batch, kv_heads, head_dim))
    return [torch.randn(s, generator=gen, device="cuda", dtype=dtype).requires_grad_() for s in shapes]


def _compare(out, ref, inputs):
    torch.testing.assert_close(out.double(), ref, **BF16_TOL)
    grad_out = torch.randn(out.shape, generator=torch.Generator(device="cuda").manual_seed(1), device="cuda")
    got = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    want = torch.autograd.grad(ref, inputs, grad_out.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), **BF16_TOL)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 8, 64), (8, 2, 128), (6, 2, 40)])
def test_ring_cuda_flash_kernel_at_cp1(heads, kv_heads, head_dim):
    from megatron_solopo.model.attention import ring_attention

    q, k, v = _qkv(256, 2, heads, kv_heads, head_dim)
    out = ring_attention(q, k, v, None, causal=True, block_kernel="cuda_flash")
    allowed = torch.ones(256, 256, dtype=torch.bool, device="cuda").tril()
    _compare(out.reshape(256, 2, -1), naive_attention(q, k, v, allowed), (q, k, v))
    cu = torch.tensor([0, 96, 256], device="cuda")
    q1, k1, v1 = (x[:, :1] for x in (q, k, v))
    out = ring_attention(q1, k1, v1, None, causal=True, cu_seqlens_padded=cu, block_kernel="cuda_flash")
    ref = packed_reference(q1[:, 0].cpu(), k1[:, 0].cpu(), v1[:, 0].cpu(), [96, 160], [96, 160]).cuda()
    _compare(out.reshape(256, 1, -1), ref.reshape(256, 1, -1), (q, k, v))


def test_sdpa_core_attention_bf16_cuda():
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_solopo.model.attention import SDPACoreAttention

    config = TransformerConfig(num_layers=1, hidden_size=8 * 64, num_attention_heads=8, num_query_groups=2,
                               kv_channels=64, attention_dropout=0.0, bf16=True, params_dtype=torch.bfloat16)
    module = SDPACoreAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                               attention_type="self", cp_comm_type=None, softmax_scale=None, pg_collection=None)
    q, k, v = _qkv(512, 2, 8, 2, 64)
    allowed = torch.ones(512, 512, dtype=torch.bool, device="cuda").tril()
    _compare(module(q, k, v, None), naive_attention(q, k, v, allowed), (q, k, v))
    cu_real = torch.tensor([0, 100, 400], dtype=torch.int32, device="cuda")
    cu_padded = torch.tensor([0, 112, 512], dtype=torch.int32, device="cuda")
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_real, cu_seqlens_kv=cu_real,
                             cu_seqlens_q_padded=cu_padded, cu_seqlens_kv_padded=cu_padded,
                             max_seqlen_q=400, max_seqlen_kv=400)
    q3, k3, v3 = (x[:, 0] for x in (q, k, v))
    out = module(q3, k3, v3, None, attn_mask_type=AttnMaskType.padding_causal, packed_seq_params=params)
    ref = packed_reference(q3.cpu(), k3.cpu(), v3.cpu(), [100, 300], [112, 400]).cuda()
    _compare(out, ref.reshape(512, 1, -1), (q, k, v))


def test_te_and_sdpa_paths_give_the_same_loss():
    from megatron_solopo.model import ModelConfig, get_preset
    from megatron_solopo.model.families.tables import te_to_local_name
    from megatron_solopo.model.backends import te_importable
    from megatron_solopo.model.builder import build_gpt_model
    from megatron_solopo.parallel import ParallelConfig, initialize_parallel

    if not te_importable():
        pytest.skip("Transformer Engine does not import here")
    parallel = initialize_parallel(ParallelConfig(), seed=3)
    preset = get_preset("tiny").replace(num_attention_heads=4, hidden_size=256, ffn_hidden_size=512)
    losses = {}
    local_weights = None
    for backend in ("sdpa", "te"):
        model = build_gpt_model(preset, parallel, ModelConfig(attention_backend=backend, params_dtype="bf16")).cuda()
        if local_weights is None:
            local_weights = model.state_dict()
        else:
            te_state = model.state_dict()
            mapped = {name: local_weights[te_to_local_name(name)] for name in te_state
                      if not name.endswith("_extra_state")}
            missing = model.load_state_dict(mapped, strict=False).missing_keys
            assert all(name.endswith("_extra_state") for name in missing), missing
        gen = torch.Generator(device="cuda").manual_seed(0)
        tokens = torch.randint(0, preset.vocab_size, (2, 1025), device="cuda", generator=gen)
        position_ids = torch.arange(1024, device="cuda").unsqueeze(0).expand(2, -1)
        with torch.no_grad():
            per_token = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:])
        losses[backend] = per_token.float().mean().item()
    assert math.isclose(losses["sdpa"], losses["te"], rel_tol=2e-2), losses
