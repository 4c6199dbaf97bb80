"""`solopo plan`: the fake-tensor dry run of the training step against the same step on real tensors.

- fake vs real peak live bytes within 5% (issue 15, item 2), and the same persistent parts, for the
  tiny preset at TP=1 in one process (SoLoPO without recompute, long-PO with full recompute) and at
  CP=2, TP=2, TP=2 with sequence parallelism and PP=2 (each rank of 2 real gloo processes vs the same
  rank of a fake group of 2, so both pipeline stages; selective recompute);
- the fake run answers the data-dependent reads it meets from the batch's real values or placeholders,
  and names the ops it could not run fake;
- `solopo plan` prints the breakdown of rank 0 of a TP=2 x CP=2 layout (a fake group of 4 ranks, one
  process) and writes it as JSON; the weights per rank halve from TP=1 to TP=2.
"""

import json
import os
import subprocess
import sys

import pytest
from dist_utils import run_distributed

CASES = {
    "solo": dict(mode="solo", recompute="none"),
    "long+full-recompute": dict(mode="long", recompute="full"),
}


def _fake_and_real(rank, world_size):
    from megatron_solopo.plan import PlanSpec, plan_step

    out = {}
    for name, extra in CASES.items():
        spec = PlanSpec(preset="tiny", short_tokens=48, long_tokens=400, response_tokens=12, params_dtype="fp32",
                        **extra)
        for fake in (True, False):
            result = plan_step(spec, fake=fake)
            out[(name, fake)] = result.memory.as_dict()
    return out


@pytest.fixture(scope="module")
def fake_and_real():
    return run_distributed(_fake_and_real, 1)[0]


# PP=2 runs 4 micro-batches, so the first stage holds 2 in flight (1F1B warm-up) and the last one 1
LAYOUTS = {"cp2": dict(cp=2), "tp2": dict(tp=2), "tp2_sp": dict(tp=2, sequence_parallel=True),
           "pp2": dict(pp=2, num_microbatches=4)}


def _two_ranks(rank, world_size):
    """Real tensors on 2 gloo ranks (one process group for all layouts), then each rank plays the same
    rank of a fake group (rank 1: the last pipeline stage at PP=2, a second replica/shard elsewhere)."""
    import dataclasses

    import torch.distributed as dist

    from megatron_solopo.parallel.distributed import init_process_group
    from megatron_solopo.plan import PlanSpec, plan_step

    specs = {name: PlanSpec(preset="tiny", short_tokens=48, long_tokens=400, response_tokens=12,
                            params_dtype="fp32", recompute="selective", **sizes) for name, sizes in LAYOUTS.items()}
    init_process_group()
    real = {name: plan_step(spec, fake=False).memory.as_dict() for name, spec in specs.items()}
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    fake = {}
    for name, spec in specs.items():
        if rank == 0 or spec.pp > 1:
            fake_spec = dataclasses.replace(spec, stage="last") if rank == 1 else spec
            fake[name] = plan_step(fake_spec, fake=True).memory.as_dict()
    return {"real": real, "fake": fake}


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_two_ranks, 2)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fake_rank0_matches_real_rank0_at_two_ranks(two_ranks, layout):
    fake, real = two_ranks[0]["fake"][layout], two_ranks[0]["real"][layout]
    assert abs(fake["peak_bytes"] - real["peak_bytes"]) <= 0.05 * real["peak_bytes"], (fake, real)
    for category in ("weights", "gradients (DDP buffer)", "optimizer states"):
        assert fake["persistent_bytes"][category] == real["persistent_bytes"][category], category


def test_fake_last_pipeline_stage_matches_real_last_stage(two_ranks):
    first, last = two_ranks[0], two_ranks[1]
    fake, real = last["fake"]["pp2"], last["real"]["pp2"]
    assert abs(fake["peak_bytes"] - real["peak_bytes"]) <= 0.05 * real["peak_bytes"], (fake, real)
    for category in ("weights", "gradients (DDP buffer)", "optimizer states"):
        assert fake["persistent_bytes"][category] == real["persistent_bytes"][category], category
    # the first stage keeps two micro-batches' activations during the 1F1B warm-up, the last one
    assert first["fake"]["pp2"]["activations_bytes"] > 1.3 * fake["activations_bytes"]


def test_print_two_rank_peaks(two_ranks, capsys):
    """The measured bytes, for docs/scaling.md ("What is validated")."""
    with capsys.disabled():
        for rank, result in enumerate(two_ranks):
            for layout, fake in result["fake"].items():
                print(f"\nrank {rank} {layout}: fake peak {fake['peak_bytes']:,} B, "
                      f"real peak {result['real'][layout]['peak_bytes']:,} B")


@pytest.mark.parametrize("case", list(CASES))
def test_fake_peak_matches_real_peak(fake_and_real, case):
    fake, real = fake_and_real[(case, True)], fake_and_real[(case, False)]
    assert real["peak_bytes"] > 0
    assert abs(fake["peak_bytes"] - real["peak_bytes"]) <= 0.05 * real["peak_bytes"], (fake, real)
    for category in ("weights", "gradients (DDP buffer)", "optimizer states"):
        assert fake["persistent_bytes"][category] == real["persistent_bytes"][category], category
    assert fake["activations_bytes"] > 0 and fake["peak_phase"] == real["peak_phase"]
    # the real run never needs a placeholder; the fake one does (NaN flags, grad norm) but steers no shape with it
    assert real["placeholder_reads"] == 0 and fake["placeholder_reads"] > 0


def test_parts_add_up_and_grad_buffer_is_fp32(fake_and_real):
    memory = fake_and_real[("solo", True)]
    parts = memory["persistent_bytes"]
    assert sum(parts.values()) + memory["activations_bytes"] == memory["peak_bytes"]
    assert {"forward", "backward", "optimizer"} <= set(memory["phase_peaks"])
    assert max(memory["phase_peaks"].values()) == memory["peak_bytes"]
    assert parts["gradients (DDP buffer)"] == parts["weights"]  # fp32 model, fp32 grads
    assert parts["optimizer states"] >= 2 * parts["weights"]  # Adam exp_avg + exp_avg_sq


def _cli(tmp_path, *args):
    out = tmp_path / f"plan{len(list(tmp_path.iterdir()))}.json"
    proc = subprocess.run([sys.executable, "-m", "megatron_solopo.cli", "plan", "--preset", "tiny", "--short", "64",
                           "--long", "512", "--response", "16", "--dtype", "fp32", "--json", str(out), *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SOLOPO_DEVICE": "cpu", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_cli_plans_a_tp2_cp2_rank_in_one_process(tmp_path):
    stdout, plan = _cli(tmp_path, "--tp", "2", "--cp", "2", "--recompute", "selective")
    assert "dry run (fake tensors)" in stdout and "PEAK" in stdout and "tp=2 pp=1 cp=2" in stdout
    assert plan["fake"] and plan["spec"]["tp"] == 2 and plan["spec"]["cp"] == 2
    weights = plan["memory"]["persistent_bytes"]["weights"]
    # tiny: the 2 x 256 x 64 embedding/output and the layers' linears are split by TP, norms are not
    assert 200_000 < weights < 427_264 / 1.8, weights
    assert plan["memory"]["peak_bytes"] > weights


def test_token_counts_parse_with_suffixes():
    from megatron_solopo.plan import parse_tokens

    assert [parse_tokens(x) for x in ("4096", "32K", "128k", "1M", 7)] == [4096, 32768, 131072, 1048576, 7]
    with pytest.raises(ValueError, match="K/M suffix"):
        parse_tokens("1.5M")
