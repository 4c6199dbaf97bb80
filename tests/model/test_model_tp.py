"""GPTModel on CPU through the shim: TP=1 and TP=2 (gloo) give the same logits and gradients."""

import torch

from dist_utils import run_distributed


def _forward_backward(rank, world_size, tp, backend):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_solopo.model import ModelConfig, get_preset
    from megatron_solopo.model.builder import build_gpt_model
    from megatron_solopo.parallel import ParallelConfig, current_parallel_context, initialize_parallel, shim_active

    parallel = initialize_parallel(ParallelConfig(tp=tp), seed=7)
    model = build_gpt_model(get_preset("tiny"), parallel, ModelConfig(attention_backend=backend))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 24), generator=gen)
    position_ids = torch.arange(24).unsqueeze(0).expand(2, -1)
    logits = model(tokens, position_ids, None)  # [b, s, V/tp]
    full_logits = gather_from_tensor_model_parallel_region(logits)  # [b, s, V]
    full_logits.float().pow(2).mean().backward()
    # a replicated weight (not split by TP) and the TP-split QKV gathered back
    norm_grad = model.decoder.layers[0].input_layernorm.weight.grad.clone()
    ps = parallel_state
    context = {  # the ParallelContext initialize_parallel returned agrees with Megatron's globals
        "sizes": (parallel.tp_size, parallel.pp_size, parallel.cp_size, parallel.dp_size, parallel.world_size),
        "ranks_match": (parallel.tp_rank, parallel.pp_rank, parallel.cp_rank, parallel.dp_rank, parallel.rank) == (
            ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
            ps.get_context_parallel_rank(), ps.get_data_parallel_rank(), torch.distributed.get_rank()),
        "groups_match": (parallel.tp_group is ps.get_tensor_model_parallel_group()
                         and parallel.cp_group is ps.get_context_parallel_group()
                         and parallel.dp_group is ps.get_data_parallel_group()
                         and parallel.pg_collection.tp is parallel.tp_group
                         and model.pg_collection is parallel.pg_collection),
        "stages": (parallel.is_first_stage(), parallel.is_last_stage(), parallel.pp_last_rank),
        "current": current_parallel_context() is parallel, "layout": parallel.layout(),
        "divisor": parallel.seq_len_divisor(fp8="hybrid"),
    }
    return {"logits": full_logits.detach(), "norm_grad": norm_grad, "shim": shim_active(),
            "tp_world": parallel_state.get_tensor_model_parallel_world_size(), "context": context}


def test_tp1_equals_tp2_logits_and_grads():
    for backend in ("local",):
        tp1 = run_distributed(_forward_backward, 1, 1, backend)[0]
        tp2 = run_distributed(_forward_backward, 2, 2, backend)
        assert tp1["shim"] and tp2[0]["tp_world"] == 2
        for rank, result in enumerate(tp2):
            context = result["context"]
            assert context["sizes"] == (2, 1, 1, 1, 2) and context["ranks_match"] and context["groups_match"]
            assert context["stages"] == (True, True, rank) and context["current"] and context["divisor"] == 16
            assert context["layout"] == {"tp": 2, "pp": 1, "cp": 1, "dp": 1, "vpp": 1, "world": 2}
        for rank_result in tp2:
            torch.testing.assert_close(rank_result["logits"], tp1["logits"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(rank_result["norm_grad"], tp1["norm_grad"], rtol=1e-4, atol=1e-6)
        assert tp1["logits"].abs().max() > 0  # a real model ran, not zeros
