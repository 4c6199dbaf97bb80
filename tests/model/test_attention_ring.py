"""Ring attention over gloo: 4 CPU processes, CP groups of 2 (two groups) and of 4.

One spawned group runs every case (importing torch + megatron costs ~10 s per process); each rank
returns its shards of the output and of dQ/dK/dV, and the parent compares the stitched tensors
with float64 naive attention on the full sequence (references in test_attention_core.py).
"""

import pytest
import torch
from dist_utils import run_distributed
from megatron.core.transformer.enums import AttnMaskType
from test_attention_core import naive_attention, packed_reference

from megatron_solopo.parallel.cp import cp_unshard, cp_unshard_thd

WORLD = 4
SEQ = 24  # a multiple of 2*cp for cp = 2 and 4

# name -> (heads, kv_heads, head_dim, batch, causal, packed padded lengths or None, block kernel)
RING_CASES = {
    "causal_mha_math": (4, 4, 16, 2, True, None, "math"),
    "causal_mha_cpu_flash": (4, 4, 16, 2, True, None, "cpu_flash"),
    "causal_gqa_d40": (6, 2, 40, 2, True, None, "auto"),
    "causal_mqa_d24_math": (4, 1, 24, 1, True, None, "math"),
    "full_gqa_d24": (4, 2, 24, 2, False, None, "auto"),
    "packed_gqa_d24_math": (4, 2, 24, 1, True, [8, 24, 16], "math"),
    "packed_gqa_d40_cpu_flash": (6, 2, 40, 1, True, [16, 8, 8, 16], "cpu_flash"),
}
# packed batch through SDPACoreAttention: real lengths inside padded lengths (multiples of 8)
MODULE_PACK_REAL, MODULE_PACK_PADDED = [5, 20, 16, 1], [8, 24, 16, 8]


def make_inputs(name, heads, kv_heads, head_dim, batch, padded_lens):
    """Full-sequence q, k, v, grad_out [T, b, h, d]; deterministic per case name."""
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    tokens = sum(padded_lens) if padded_lens else SEQ
    q = torch.randn(tokens, batch, heads, head_dim, generator=gen)
    k = torch.randn(tokens, batch, kv_heads, head_dim, generator=gen)
    v = torch.randn(tokens, batch, kv_heads, head_dim, generator=gen)
    grad_out = torch.randn(tokens, batch, heads, head_dim, generator=gen)
    return q, k, v, grad_out


def _cu(lengths):
    return torch.tensor([0] + lengths).cumsum(0).int()


def _shard(x, cp_rank, cp_size, padded_lens):
    from megatron_solopo.parallel.cp import cp_shard, cp_shard_thd

    if padded_lens:
        return cp_shard_thd(x, _cu(padded_lens), 0, cp_rank, cp_size)
    return cp_shard(x, 0, cp_rank, cp_size)


def _ring_cases(cp_group, cp_rank, cp_size):
    from megatron_solopo.model.attention import ring_attention

    results = {}
    for name, (heads, kv_heads, head_dim, batch, causal, padded, kernel) in RING_CASES.items():
        q, k, v, grad_out = (_shard(x, cp_rank, cp_size, padded)
                             for x in make_inputs(name, heads, kv_heads, head_dim, batch, padded))
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        out = ring_attention(q, k, v, cp_group, causal=causal, block_kernel=kernel,
                             cu_seqlens_padded=_cu(padded) if padded else None)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
        results[name] = [x.detach() for x in (out, dq, dk, dv)]
    return results


def _module(cp_size, mask_type=AttnMaskType.causal, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_solopo.model.attention import SDPACoreAttention

    settings = dict(attention_dropout=0.0, cp_comm_type="p2p")
    settings.update(overrides)
    cp_comm_type = settings.pop("cp_comm_type")
    config = TransformerConfig(num_layers=1, hidden_size=96, num_attention_heads=4, num_query_groups=2,
                               kv_channels=24, context_parallel_size=cp_size, **settings)
    return SDPACoreAttention(config=config, layer_number=1, attn_mask_type=mask_type, attention_type="self",
                             cp_comm_type=cp_comm_type, softmax_scale=None, pg_collection=None)


def _module_cases(cp_rank, cp_size):
    """SDPACoreAttention under CP (no pg_collection: the current context's CP group): sbhd, THD with padding."""
    from megatron.core.packed_seq_params import PackedSeqParams

    results = {}
    q, k, v, grad_out = (_shard(x, cp_rank, cp_size, None) for x in make_inputs("module_sbhd", 4, 2, 24, 2, None))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = _module(cp_size)(q, k, v, None)  # [s_local, b, h*d]
    grads = torch.autograd.grad(out, (q, k, v), grad_out.reshape(out.shape))
    results["module_sbhd"] = [out.detach(), *grads]

    padded = MODULE_PACK_PADDED
    q, k, v, grad_out = (_shard(x, cp_rank, cp_size, padded)[:, 0]  # THD: [t_local, h, d]
                         for x in make_inputs("module_thd", 4, 2, 24, 1, padded))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=_cu(MODULE_PACK_REAL), cu_seqlens_kv=_cu(MODULE_PACK_REAL),
                             cu_seqlens_q_padded=_cu(padded), cu_seqlens_kv_padded=_cu(padded),
                             max_seqlen_q=max(padded), max_seqlen_kv=max(padded))
    out = _module(cp_size, AttnMaskType.padding_causal)(q, k, v, None, packed_seq_params=params)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.reshape(out.shape))
    results["module_thd"] = [out.detach(), *grads]
    return results


def _helper_checks(cp_group, cp_rank, cp_size):
    """cp_shard vs Megatron's get_batch_on_this_cp_rank; cp_gather / cp_all_reduce_sum autograd."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_solopo.parallel.cp import cp_all_reduce_sum, cp_gather, cp_shard

    batch = {"tokens": torch.arange(2 * SEQ).reshape(2, SEQ), "labels": torch.arange(2 * SEQ).reshape(2, SEQ) + 1,
             "attention_mask": torch.rand(2, 1, SEQ, SEQ) > 0.5, "cu_seqlens": None}
    expected = get_batch_on_this_cp_rank(dict(batch), is_hybrid_cp=False, cp_group=cp_group)
    matches_megatron = all(torch.equal(cp_shard(batch[key], dim, cp_rank, cp_size), expected[key])
                           for key, dim in (("tokens", 1), ("labels", 1), ("attention_mask", 2)))

    full = torch.arange(SEQ, dtype=torch.float64).reshape(1, SEQ) * (cp_size + 1)
    local = cp_shard(full, 1, cp_rank, cp_size).requires_grad_()
    gathered = cp_gather(local, 1, cp_group)
    (gathered * torch.arange(SEQ, dtype=torch.float64)).sum().backward()

    value = torch.tensor([float(cp_rank + 1)], requires_grad=True)
    total = cp_all_reduce_sum(value * 3.0, cp_group)
    total.sum().backward()
    # d(sum(gathered * arange))/d(local) is this rank's shard of arange
    expected_gather_grad = cp_shard(torch.arange(SEQ, dtype=torch.float64).reshape(1, SEQ), 1, cp_rank, cp_size)
    return {"matches_megatron": matches_megatron, "gathered": gathered.detach(), "gather_grad": local.grad,
            "expected_gather_grad": expected_gather_grad, "all_reduce": total.detach(),
            "all_reduce_grad": value.grad}


def _error_checks(cp_size):
    messages = {}
    for label, overrides in (("a2a", dict(cp_comm_type="a2a")), ("dropout", dict(attention_dropout=0.1))):
        try:
            _module(cp_size, **overrides)
            messages[label] = None
        except ValueError as err:
            messages[label] = str(err)
    return messages


def _dropout_checks():
    """CP=1: dropout is applied in training (inside Megatron's RNG fork) and off in eval."""
    module = _module(1, attention_dropout=0.5)
    q, k, v, _ = make_inputs("dropout", 4, 2, 24, 2, None)
    reference = _module(1)(q, k, v, None)
    train_out = module.train()(q, k, v, None)
    eval_out = module.eval()(q, k, v, None)
    return {"train_differs": not torch.allclose(train_out, reference), "eval_equal": torch.equal(eval_out, reference)}


def _worker(rank, world_size):
    from megatron_solopo.parallel import ParallelConfig, initialize_parallel

    results = {}
    for cp_size in (2, 4):
        parallel = initialize_parallel(ParallelConfig(cp=cp_size), seed=11)
        group, cp_rank = parallel.cp_group, parallel.cp_rank
        outputs = _ring_cases(group, cp_rank, cp_size)
        outputs.update(_module_cases(cp_rank, cp_size))
        results[cp_size] = {"cp_rank": cp_rank, "outputs": outputs, "helpers": _helper_checks(group, cp_rank, cp_size),
                            "errors": _error_checks(cp_size)}
    initialize_parallel(ParallelConfig(cp=1), seed=11)
    results["dropout"] = _dropout_checks()
    return results


def _full_reference(name, heads, kv_heads, head_dim, batch, causal, padded, real=None):
    q, k, v, grad_out = make_inputs(name, heads, kv_heads, head_dim, batch, padded)
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    if padded:
        ref = packed_reference(q[:, 0], k[:, 0], v[:, 0], real or padded, padded, causal=causal)
    else:
        allowed = torch.ones(SEQ, SEQ, dtype=torch.bool)
        ref = naive_attention(q, k, v, allowed.tril() if causal else allowed)
    grads = torch.autograd.grad(ref, (q, k, v), grad_out.double().reshape(ref.shape))
    return [ref, *grads]


def _stitch(shards, padded):
    if padded:
        return cp_unshard_thd(shards, _cu(padded), 0)
    return cp_unshard(shards, 0)


def _check(results, cp_size, name, reference, padded):
    """Compare each CP group's stitched shards with the full-sequence reference."""
    for first in range(0, WORLD, cp_size):
        group_results = sorted((results[r][cp_size] for r in range(first, first + cp_size)),
                               key=lambda x: x["cp_rank"])
        for index, (label, want) in enumerate(zip(("out", "dq", "dk", "dv"), reference, strict=True)):
            got = _stitch([res["outputs"][name][index] for res in group_results], padded)
            where = f"cp={cp_size} ranks {first}..{first + cp_size - 1} case {name} {label}"
            torch.testing.assert_close(got.double().reshape(want.shape), want, atol=3e-5, rtol=1e-4,
                                       msg=lambda m, where=where: f"{where}: {m}")


@pytest.fixture(scope="module")
def results():
    """Every rank's results, from one spawned group of WORLD processes for the whole module."""
    return run_distributed(_worker, WORLD)


def test_ring_attention_matches_full_attention_on_2_and_4_ranks(results):
    for name, (heads, kv_heads, head_dim, batch, causal, padded, _) in RING_CASES.items():
        reference = _full_reference(name, heads, kv_heads, head_dim, batch, causal, padded)
        for cp_size in (2, 4):
            _check(results, cp_size, name, reference, padded)
    sbhd_ref = _full_reference("module_sbhd", 4, 2, 24, 2, True, None)
    thd_ref = _full_reference("module_thd", 4, 2, 24, 1, True, MODULE_PACK_PADDED, real=MODULE_PACK_REAL)
    thd_ref = [thd_ref[0].reshape(sum(MODULE_PACK_PADDED), 1, -1)] + [g[:, 0] for g in thd_ref[1:]]
    for cp_size in (2, 4):
        _check(results, cp_size, "module_sbhd", sbhd_ref, None)
        _check(results, cp_size, "module_thd", thd_ref, MODULE_PACK_PADDED)


def test_cp_helpers_and_config_errors_on_2_and_4_ranks(results):
    for rank_results in results:
        for cp_size in (2, 4):
            res = rank_results[cp_size]
            helpers = res["helpers"]
            assert helpers["matches_megatron"], f"cp_shard differs from get_batch_on_this_cp_rank at cp={cp_size}"
            full = torch.arange(SEQ, dtype=torch.float64).reshape(1, SEQ) * (cp_size + 1)
            torch.testing.assert_close(helpers["gathered"], full)
            torch.testing.assert_close(helpers["gather_grad"], helpers["expected_gather_grad"])
            # 3 * (1 + 2 + ... + cp): the sum; identity backward: d/dvalue = 3 on every rank
            assert helpers["all_reduce"].item() == 3.0 * cp_size * (cp_size + 1) / 2
            assert helpers["all_reduce_grad"].item() == 3.0
            assert "p2p ring" in res["errors"]["a2a"]
            assert "dropout" in res["errors"]["dropout"]
        assert rank_results["dropout"] == {"train_differs": True, "eval_equal": True}
