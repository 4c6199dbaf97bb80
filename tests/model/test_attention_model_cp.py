"""A whole GPTModel (sdpa backend) at CP=2 equals CP=1: per-token log-probs and parameter gradients.

Two gloo processes. Phase 1 initializes CP=1 (the two ranks are data-parallel replicas) and runs the
full sequence; phase 2 initializes CP=2, loads the same weights, feeds each rank its zigzag shard
(cp_shard / cp_shard_thd) and sums the parameter gradients over the CP group: the sum of the
ranks' partial losses is the CP=1 loss, so the summed gradients must be the CP=1 gradients. Both
an unpacked batch [b, s] and a packed (THD) batch with padded sequences of unequal lengths.
"""

import pytest
import torch
from dist_utils import run_distributed

SEQ = 16
PACK_REAL, PACK_PADDED = [7, 12, 4], [8, 12, 4]  # padded lengths: multiples of 2*cp = 4
PARAMS_TO_CHECK = ("embedding.word_embeddings.weight", "decoder.layers.0.self_attention.linear_qkv.weight",
                   "decoder.layers.1.self_attention.linear_proj.weight", "decoder.final_layernorm.weight",
                   "output_layer.weight")


def _batches():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 256, (2, SEQ + 1), generator=gen)
    packed = torch.randint(0, 256, (1, sum(PACK_PADDED) + 1), generator=gen)
    weights = torch.rand(2, SEQ, generator=gen)  # per-token loss weights: the loss is sum(w * logp)
    packed_weights = torch.rand(1, sum(PACK_PADDED), generator=gen)
    start = 0
    for real, padded in zip(PACK_REAL, PACK_PADDED):  # padding tokens carry no loss
        packed_weights[:, start + real:start + padded] = 0
        start += padded
    return {"sbhd": (tokens[:, :-1], tokens[:, 1:], weights), "thd": (packed[:, :-1], packed[:, 1:], packed_weights)}


def _cu(lengths):
    return torch.tensor([0] + lengths).cumsum(0).int()


def _packed_params():
    from megatron.core.packed_seq_params import PackedSeqParams

    real, padded = _cu(PACK_REAL), _cu(PACK_PADDED)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=real, cu_seqlens_kv=real, cu_seqlens_q_padded=padded,
                           cu_seqlens_kv_padded=padded, max_seqlen_q=max(PACK_PADDED),
                           max_seqlen_kv=max(PACK_PADDED))


def _run(model, layout, cp_rank, cp_size):
    """Per-token log-probs of this rank's tokens and the gradients of sum(weights * log-probs)."""
    from megatron_solopo.parallel.cp import cp_shard, cp_shard_thd

    inputs, labels, weights = _batches()[layout]
    if layout == "sbhd":
        shard = lambda x: cp_shard(x, 1, cp_rank, cp_size)  # noqa: E731
        packed = None
    else:
        shard = lambda x: cp_shard_thd(x, _cu(PACK_PADDED), 1, cp_rank, cp_size)  # noqa: E731
        packed = _packed_params()
    inputs, labels, weights = shard(inputs), shard(labels), shard(weights)
    position_ids = torch.arange(inputs.size(1)).unsqueeze(0).expand_as(inputs)  # unused by CP-aware RoPE
    model.zero_grad()
    token_logps = -model(inputs, position_ids, None, labels=labels, packed_seq_params=packed)  # [b, s_local]
    (token_logps * weights).sum().backward()
    return token_logps.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _worker(rank, world_size):
    import torch.distributed as dist

    from megatron_solopo.model import ModelConfig, get_preset
    from megatron_solopo.model.builder import build_gpt_model
    from megatron_solopo.parallel import ParallelConfig, initialize_parallel

    preset, model_config = get_preset("tiny"), ModelConfig(attention_backend="sdpa")
    parallel = initialize_parallel(ParallelConfig(cp=1), seed=5)
    model = build_gpt_model(preset, parallel, model_config)
    weights = {k: v.clone() for k, v in model.state_dict().items() if v is not None}
    full = {layout: _run(model, layout, 0, 1) for layout in ("sbhd", "thd")}

    parallel = initialize_parallel(ParallelConfig(cp=2), seed=5)
    model = build_gpt_model(preset, parallel, model_config)
    model.load_state_dict(weights, strict=False)
    cp_rank, group = parallel.cp_rank, parallel.cp_group
    sharded = {}
    for layout in ("sbhd", "thd"):
        token_logps, grads = _run(model, layout, cp_rank, 2)
        for grad in grads.values():  # each rank's loss is a part of the total: sum the parts' gradients
            dist.all_reduce(grad, group=group)
        sharded[layout] = (token_logps, grads)
    return {"cp_rank": cp_rank, "full": full, "sharded": sharded}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 2)


@pytest.mark.parametrize("layout", ["sbhd", "thd"])
def test_gpt_model_cp2_equals_cp1(results, layout):
    from megatron_solopo.parallel.cp import cp_unshard, cp_unshard_thd

    by_cp_rank = sorted(results, key=lambda r: r["cp_rank"])
    full_logps, full_grads = by_cp_rank[0]["full"][layout]
    shards = [r["sharded"][layout][0] for r in by_cp_rank]
    logps = cp_unshard(shards, 1) if layout == "sbhd" else cp_unshard_thd(shards, _cu(PACK_PADDED), 1)
    # every token, padding included: padding rows get zero attention output at CP=1 and CP=2 alike
    torch.testing.assert_close(logps, full_logps, atol=2e-5, rtol=1e-5)
    assert full_logps.max() < 0 and full_logps.std() > 0  # real log-probs of a random model, not zeros
    for name in PARAMS_TO_CHECK:
        for result in by_cp_rank:
            grad = result["sharded"][layout][1][name]
            torch.testing.assert_close(grad, full_grads[name], atol=2e-6, rtol=2e-4,
                                       msg=lambda m, name=name: f"{name}: {m}")
        assert full_grads[name].abs().max() > 0
