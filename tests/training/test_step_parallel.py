"""The SoLoPO step is invariant to the parallel layout: TP (with and without sequence parallelism), PP, CP,
DP and micro-batching.

One 2-process gloo group runs every layout in turn (re-initializing Megatron's groups), through the
real path: collate_microbatches -> Megatron's pipeline schedule -> DDP -> Megatron's optimizer. The
optimizer is Adam with lr = eps = 1e6 and no clipping: its first update is -lr * g / (|g| + eps) =
-g / (1 + |g| / 1e6), i.e. the negative gradient to 1e-7 relative (Megatron's distributed optimizer
accepts only Adam, so SGD cannot serve here). The reference is computed without
Megatron's schedule/DDP/optimizer: plain autograd of the MEAN objective over all pairs, on an
unwrapped TP=2 model. Every layout's full (TP-reassembled) update must equal -reference gradient.
"""

import math

import pytest
import torch
from dist_utils import run_distributed
from step_helpers import (assemble, assert_loss_and_counts_are_global, assert_update_is_minus_reference_gradient,
                          build_layout, make_samples, manual_reference, run_timed, train_layout,
                          with_synthetic_reference_logps)

NUM_PAIRS = 4


def _samples():
    return with_synthetic_reference_logps(make_samples(NUM_PAIRS, seed=3))


def _objective():
    from megatron_solopo.objectives import ObjectiveConfig

    return ObjectiveConfig(name="dpo", mode="solo", beta=0.5, alpha=2.0)


def _train_layout(tp, pp, cp, backend, layout, micro_batch_pairs, distributed_optimizer=False, preset="tiny",
                  virtual_pp=None, sequence_parallel=False):
    return train_layout(_samples(), _objective(), tp, pp, cp, backend, layout, micro_batch_pairs,
                        distributed_optimizer=distributed_optimizer, preset=preset, virtual_pp=virtual_pp,
                        sequence_parallel=sequence_parallel)


def _manual_reference():
    """Mean objective over all pairs, plain autograd on an unwrapped TP=2 model (no schedule/DDP/optimizer)."""
    return manual_reference(_samples(), _objective(), tp=2)


def _dpo_anchor_at_cp2():
    """SoLo-DPO at step 0 with reference == policy: preference term ln 2, SoLo-RA term 0."""
    from megatron_solopo.objectives import ObjectiveConfig, required_reference_sequences
    from megatron_solopo.training.batching import collate_microbatches, collate_scoring_microbatches
    from megatron_solopo.training.config import TrainConfig
    from megatron_solopo.training.optim import build_training_objects
    from megatron_solopo.training.step import forward_only, train_step

    parallel, chunks = build_layout(1, 1, 2, "sdpa")
    chunks, optimizer, scheduler = build_training_objects(chunks, TrainConfig(lr=1e-3), total_steps=4)
    objective = ObjectiveConfig(name="dpo", mode="solo", beta=0.1, alpha=3.0)
    samples = make_samples(NUM_PAIRS, seed=5)
    scoring = collate_scoring_microbatches(samples, sorted(required_reference_sequences(objective)), parallel,
                                           "packed", 3)  # 3 + 1 pairs: a partial last micro-batch
    reference = forward_only(chunks, scoring, parallel)
    for sample in samples:
        for role, value in reference[sample["id"]].items():
            sample[f"ref_{role}_logps"] = value
    result = train_step(chunks, optimizer, scheduler, collate_microbatches(samples, objective, parallel, "packed", 2),
                        objective, parallel, step_index=0)
    return {"metrics": result.metrics, "loss": result.loss, "reference": reference}


def _sequence_parallel_head():
    """The head with a sequence-parallel output layer equals the plain TP head (values and input grads)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_solopo.model.logprobs import LogprobHeadConfig, response_logprob_sums
    from megatron_solopo.parallel import ParallelConfig, initialize_parallel
    from megatron_solopo.training.batching import collate_scoring_microbatches

    roles = ("short_chosen", "short_rejected", "long_chosen")
    out = {}
    for sp in (False, True):
        parallel = initialize_parallel(ParallelConfig(tp=2, sequence_parallel=sp), seed=1)
        cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, tensor_model_parallel_size=2,
                                sequence_parallel=sp, use_cpu_initialization=True, gradient_accumulation_fusion=False)
        torch.manual_seed(0)
        layer = ColumnParallelLinear(16, 64, config=cfg, init_method=torch.nn.init.normal_, bias=False,
                                     gather_output=False)
        # the same pack with and without SP: the caller's multiple applies to the local shard, which SP
        # splits over the 2 TP ranks, so 1 with SP pads like 2 without (asserted below)
        mb = collate_scoring_microbatches(make_samples(3, seed=9), roles, parallel, "packed", 3,
                                          pad_to_multiple_of=1 if sp else 2)[0]
        seq_len = mb.tokens.size(1)
        hidden_full = torch.randn(seq_len, 1, 16, generator=torch.Generator().manual_seed(1))  # [s, b, h]
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        hidden = hidden_full.chunk(2, dim=0)[tp_rank] if sp else hidden_full
        hidden = hidden.clone().requires_grad_(True)
        targets_ok = mb.rows.targets.remainder(64)  # the toy layer has a 64-token vocabulary
        mb.rows.targets = targets_ok
        if sp:
            mb.rows.sp_targets = mb.rows.sp_targets.remainder(64)
        sums = response_logprob_sums(hidden, layer, mb.rows, head=LogprobHeadConfig(chunk_tokens=4))
        (sums * torch.arange(1, sums.numel() + 1)).sum().backward()
        grad = hidden.grad
        if sp:  # reassemble the sequence-parallel input gradient
            pieces = [torch.empty_like(grad) for _ in range(2)]
            torch.distributed.all_gather(pieces, grad, group=parallel_state.get_tensor_model_parallel_group())
            grad = torch.cat(pieces)
        out[sp] = {"sums": sums.detach(), "grad": grad, "n_seq": len(roles) * 3, "tokens": mb.tokens.clone()}
    return out


def _worker(rank, world_size):
    runs = {
        "reference": _manual_reference,
        "tp2_mb4x1": lambda: _train_layout(2, 1, 1, "sdpa", "packed", micro_batch_pairs=4),
        "tp2_mb1x4": lambda: _train_layout(2, 1, 1, "sdpa", "packed", micro_batch_pairs=1),
        "tp2_sp_sdpa": lambda: _train_layout(2, 1, 1, "sdpa", "packed", micro_batch_pairs=2, sequence_parallel=True),
        "tp2_sp_local": lambda: _train_layout(2, 1, 1, "local", "padded", micro_batch_pairs=2,
                                              sequence_parallel=True),
        "pp2": lambda: _train_layout(1, 2, 1, "sdpa", "packed", micro_batch_pairs=1),
        "cp2_packed": lambda: _train_layout(1, 1, 2, "sdpa", "packed", micro_batch_pairs=2),
        "cp2_padded": lambda: _train_layout(1, 1, 2, "sdpa", "padded", micro_batch_pairs=4),
        "dp2_local_distopt": lambda: _train_layout(1, 1, 1, "local", "padded", micro_batch_pairs=1,
                                                   distributed_optimizer=True),
        # interleaved pipeline (2 stages x 2 virtual chunks) needs 4 layers: compared with TP=2 on the same model
        "tp2_4layer": lambda: _train_layout(2, 1, 1, "sdpa", "packed", micro_batch_pairs=4, preset="tiny-4layer"),
        "vpp2_4layer": lambda: _train_layout(1, 2, 1, "sdpa", "packed", micro_batch_pairs=1, preset="tiny-4layer",
                                             virtual_pp=2),
        "anchor": _dpo_anchor_at_cp2,
        "sp_head": _sequence_parallel_head,
    }
    return run_timed(runs)


@pytest.fixture(scope="module")
def group_results():
    return run_distributed(_worker, 2)


LAYOUTS = ["tp2_mb4x1", "tp2_mb1x4", "tp2_sp_sdpa", "tp2_sp_local", "pp2", "cp2_packed", "cp2_padded",
           "dp2_local_distopt"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_update_equals_minus_mean_loss_gradient(group_results, layout):
    assert_update_is_minus_reference_gradient(group_results, layout, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loss_and_counts_are_global(group_results, layout):
    assert_loss_and_counts_are_global(group_results, layout, NUM_PAIRS)
    assert all(r[layout]["lr"] == 1e6 for r in group_results)


def test_interleaved_pipeline_equals_tensor_parallel(group_results):
    reference = assemble([r["tp2_4layer"]["update"] for r in group_results])
    update = assemble([r["vpp2_4layer"]["update"] for r in group_results])
    assert set(update) == set(reference) and any("layers.3." in name for name in reference)
    for name in reference:
        torch.testing.assert_close(update[name], reference[name], rtol=2e-4, atol=2e-6, msg=name)
    assert group_results[0]["vpp2_4layer"]["loss"] == pytest.approx(group_results[0]["tp2_4layer"]["loss"], rel=1e-5)


def test_micro_batch_count_really_differs(group_results):
    assert group_results[0]["tp2_mb1x4"]["n_microbatches"] == 4
    assert group_results[0]["tp2_mb4x1"]["n_microbatches"] == 1
    assert group_results[0]["dp2_local_distopt"]["n_microbatches"] == 2  # 2 pairs per DP rank


def test_solo_dpo_at_policy_equals_reference_is_ln2(group_results):
    for rank_result in group_results:
        metrics = rank_result["anchor"]["metrics"]
        assert metrics["loss/po"] == pytest.approx(math.log(2.0), abs=1e-6)
        assert metrics["loss/ra"] == pytest.approx(0.0, abs=1e-6)
        assert metrics["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
        assert rank_result["anchor"]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert group_results[0]["anchor"]["reference"] == group_results[1]["anchor"]["reference"]


def test_sequence_parallel_head_matches_tensor_parallel_head(group_results):
    for rank_result in group_results:
        plain, sp = rank_result["sp_head"][False], rank_result["sp_head"][True]
        assert torch.equal(plain["tokens"], sp["tokens"])  # one pack, two heads
        assert plain["sums"].shape == (plain["n_seq"],)
        torch.testing.assert_close(sp["sums"], plain["sums"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sp["grad"], plain["grad"], rtol=1e-5, atol=1e-6)
        assert plain["grad"].abs().sum() > 0


def test_print_timings(group_results, capsys):
    with capsys.disabled():
        print("\nlayout seconds:", group_results[0]["seconds"])
