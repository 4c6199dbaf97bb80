"""`solopo plan --gpus`: the roofline arithmetic against hand-computed values, the layer-scaled dry run against
the full-depth one, the analytical lower bound never above the dry run's peak, and a small search on the tiny
preset whose pruning loses no layout that fits."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from megatron_solopo.model.presets import ModelPreset, list_presets, register_preset
from megatron_solopo.plan import PlanSpec, plan_step
from megatron_solopo.plan.search import (
    Assumptions,
    Candidate,
    memory_lower_bound,
    project_time,
    sbatch_line,
    scaled_plan,
    search_layouts,
)

SIX, TWELVE = "plan-test-6layer", "plan-test-12layer"
for _name, _layers in ((SIX, 6), (TWELVE, 12)):
    if _name not in list_presets():
        register_preset(ModelPreset(_name, "llama", num_layers=_layers, hidden_size=64, ffn_hidden_size=128,
                                    num_attention_heads=4, num_query_groups=2, vocab_size=256,
                                    max_position_embeddings=4096))

TINY = PlanSpec(preset="tiny", short_tokens=64, long_tokens=1024, response_tokens=16)


def test_roofline_hand_computed():
    """tiny: h=64, f=128, 4 heads, 2 kv heads, d=16, 2 layers, vocab 256; pair = 80 + 80 + 1040 tokens.

    linear FLOPs per token = 2 layers x 2 x (64*16*8 + 4*16*64 + 3*64*128) = 147,456
    attention(s) = 2 s^2 * 4 * 16 * 2 layers = 256 s^2; LM head = 2*64*256*16 = 524,288
    model FLOPs = 3 x sum(s*147,456 + 256 s^2 + 524,288) = 2*41,877,504 + 1,292,304,384 = 1,376,059,392
    full recompute adds the layers' forward: sum(s*147,456 + 256 s^2) = 457,113,600
    rate = tp*cp (4) x 1 GFLOP/s x 0.5 = 2e9 FLOP/s -> compute 1,833,172,992 / 2e9 = 0.916586496 s
    TP: 6 all-reduces x 2 layers x 2(2-1)/2 x (600 tokens x 64 x 2 B) = 921,600 B at 1 GB/s
    CP: 4 x 2 layers x (2-1) x (600 x 2 x 32/2 x 2 B = 38,400) = 307,200 B at 1 GB/s, no overlap
    DP: 2(4-1)/4 x 1e6 B at 1 GB/s = 1.5 ms per step of 4 pairs, 2 per DP rank
    """
    a = Assumptions(gpu_peak_tflops=1e-3, mfu=0.5, nvlink_gb_s=1.0, ib_gb_s=0.5, gpus_per_node=8, cp_overlap=0.0,
                    tp_overlap=0.0, global_batch_pairs=4)
    p = project_time(TINY, Candidate(tp=2, cp=2, dp=2, recompute="full"), a, gradient_bytes=1_000_000)
    assert p.model_flops == 1_376_059_392
    assert p.hardware_flops == 1_376_059_392 + 457_113_600
    assert p.compute_s == pytest.approx(0.916586496)
    assert p.tp_comm_s == pytest.approx(921_600e-9)
    assert p.cp_comm_s == pytest.approx(307_200e-9)
    assert p.dp_comm_s_per_step == pytest.approx(1.5e-3)
    assert p.pair_s == pytest.approx(0.916586496 + 921_600e-9 + 307_200e-9)
    assert p.job_s_per_pair == pytest.approx((2 * p.pair_s + 1.5e-3) / 4)
    # no recompute: 3x forward only, 4 all-reduces and 3 K/V passes per layer
    q = project_time(TINY, Candidate(tp=2, cp=2, dp=2, recompute="none"), a, gradient_bytes=1_000_000)
    assert q.hardware_flops == q.model_flops == 1_376_059_392
    assert q.tp_comm_s == pytest.approx(4 / 6 * 921_600e-9) and q.cp_comm_s == pytest.approx(3 / 4 * 307_200e-9)
    # the ring crosses nodes when tp*cp > gpus_per_node: InfiniBand's bandwidth; overlap hides it behind attention
    across = project_time(TINY, Candidate(tp=2, cp=8, dp=1, recompute="none"), dataclasses.replace(a, gpus_per_node=4))
    tokens = 1200 / 8
    assert across.cp_comm_s == pytest.approx(3 * 2 * 7 * tokens * 2 * 16 * 2 / 0.5e9)
    hidden = project_time(TINY, Candidate(tp=2, cp=8, dp=1, recompute="none"),
                          dataclasses.replace(a, gpus_per_node=4, cp_overlap=1.0))
    attention_s = 3 * 256 * (80 ** 2 * 2 + 1040 ** 2) / (16 * 1e9 * 0.5)
    assert hidden.cp_comm_s == pytest.approx(max(0.0, across.cp_comm_s - attention_s))


def test_sbatch_lines():
    line = sbatch_line(Candidate(8, 8, 1, "full"), 64)
    assert line.startswith("sbatch --nodes 8 --gpus-per-node=8 examples/slurm/train_multi_node.sbatch CONFIG.yaml ")
    assert "parallel.tp=8 parallel.pp=1 parallel.cp=8 parallel.sequence_parallel=false model.recompute=full" in line
    assert "parallel.tp=8 parallel.pp=1 parallel.cp=8 parallel.sequence_parallel=true model.recompute=full" in \
        sbatch_line(Candidate(8, 8, 1, "full", sequence_parallel=True), 64)
    assert sbatch_line(Candidate(2, 2, 1, "none"), 4, config="x.yaml").startswith(
        "GPUS_PER_NODE=4 sbatch --gpus-per-node=4 examples/slurm/train_single_node.sbatch x.yaml ")


@pytest.mark.parametrize("layout", [dict(recompute="none"), dict(recompute="full"),
                                    dict(recompute="none", sequence_parallel=True),
                                    dict(recompute="none", pp=2, num_microbatches=3),
                                    dict(recompute="full", pp=2, num_microbatches=3, stage="last")])
def test_layer_scaled_dry_run_matches_full_depth(layout):
    """2 and 4 layers per pipeline stage, extrapolated: 6 layers at PP=1, 12 (6 per stage) at PP=2."""
    pp = layout.get("pp", 1)
    spec = PlanSpec(preset=SIX if pp == 1 else TWELVE, short_tokens=48, long_tokens=400, response_tokens=12,
                    tp=2, **layout)
    full = plan_step(spec).memory
    scaled = scaled_plan(spec)
    assert scaled.layers == (2 * pp, 4 * pp)
    assert abs(scaled.peak_bytes - full.peak_bytes) <= 64, (scaled.peak_bytes, full.peak_bytes)
    for name in ("weights", "gradients (DDP buffer)", "optimizer states"):
        assert scaled.persistent_bytes[name] == full.persistent_bytes[name], name


@pytest.mark.parametrize("layout", [dict(tp=1, cp=1, recompute="none"), dict(tp=2, cp=1, recompute="full"),
                                    dict(tp=1, cp=2, recompute="none", mode="long"),
                                    dict(tp=2, cp=2, recompute="full", params_dtype="fp32"),
                                    dict(tp=2, cp=2, recompute="none", sequence_parallel=True)])
def test_lower_bound_never_exceeds_the_dry_run(layout):
    mode = layout.pop("mode", "solo")
    dtype = layout.pop("params_dtype", "bf16")
    spec = PlanSpec(preset=SIX, short_tokens=48, long_tokens=800, response_tokens=12, mode=mode, params_dtype=dtype,
                    **layout)
    peak = plan_step(spec).memory.peak_bytes
    bound = memory_lower_bound(spec, Candidate(layout["tp"], layout["cp"], 1, layout["recompute"],
                                               layout.get("sequence_parallel", False)))
    assert 0.3 * peak < bound <= peak, (bound, peak)


def test_search_on_tiny_keeps_every_layout_that_fits():
    everything = search_layouts(TINY, gpus=4, gpu_memory_gib=1.0, top=0)
    assert {r.status for r in everything.rows} == {"fits"} and len(everything.rows) == 10  # TP 1 x CP 1/2/4, TP 2 x CP 1/2
    times = [r.projection.job_s_per_pair for r in everything.fitting()]
    assert times == sorted(times)
    peaks = {r.candidate: r.plan.peak_bytes for r in everything.rows}
    # a memory between the smallest and the largest peak: the pruned search must find exactly the same fits
    usable = sorted(peaks.values())[len(peaks) // 2]
    gib = (usable + 0.5) / 0.9 / 2 ** 30
    tight = search_layouts(TINY, gpus=4, gpu_memory_gib=gib, top=0)
    assert tight.dry_runs == 0 and tight.cache_hits > 0  # every dry run came from the cache
    fits = {r.candidate for r in tight.fitting()}
    assert fits == {c for c, peak in peaks.items() if peak <= tight.usable_bytes} and fits
    assert any(r.status.startswith("pruned") for r in tight.rows) or any(r.status == "does not fit" for r in tight.rows)
    text = "\n".join(tight.lines())
    assert "PROJECTION" in text and "PP not searched" in text and "mfu = 0.4" in text and "sbatch " in text
    top1 = search_layouts(TINY, gpus=4, gpu_memory_gib=gib, top=1)
    assert [r.candidate for r in top1.fitting()] == [tight.fitting()[0].candidate]


def test_cli_search(tmp_path):
    out = tmp_path / "search.json"
    proc = subprocess.run([sys.executable, "-m", "megatron_solopo.cli", "plan", "--preset", "tiny", "--short", "64",
                           "--long", "512", "--response", "16", "--gpus", "2", "--gpu-memory-gib", "1",
                           "--recompute", "full", "--mfu", "0.5", "--json", str(out)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SOLOPO_DEVICE": "cpu", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TP=2 SP CP=1 DP=1 recompute=full" in proc.stdout and "mfu = 0.5" in proc.stdout
    assert "parallel.sequence_parallel=true" in proc.stdout
    data = json.loads(out.read_text())
    assert data["assumptions"]["mfu"] == 0.5 and {r["candidate"]["recompute"] for r in data["rows"]} == {"full"}
    bad = subprocess.run([sys.executable, "-m", "megatron_solopo.cli", "plan", "--gpus", "2", "--tp", "2"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "SOLOPO_DEVICE": "cpu"})
    assert bad.returncode == 2 and "drop --tp" in bad.stderr


def test_scaling_table_tool_rows_and_resume(tmp_path):
    """tools/scaling_table.py: one row per cell with its reproducing command; a second run adds nothing."""
    out = tmp_path / "rows.md"
    args = [sys.executable, "tools/scaling_table.py", "--models", "tiny", "--longs", "512", "--modes", "solo",
            "--gpu-memory-gib", "0.02", "--recompute", "full", "--short", "64", "--response", "16", "--out", str(out)]
    env = {**os.environ, "SOLOPO_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    first = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 1 and "| 512 | SoLoPO | full | 0.02 GiB |" in rows[0] and "GPUs: TP=" in rows[0]
    assert "`solopo plan --preset tiny --short 64 --long 512 --response 16 --mode solo --recompute full " \
           "--smallest --gpu-memory-gib 0.02`" in rows[0]
    again = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert again.returncode == 0 and again.stdout == "" and out.read_text().count("| tiny |") == 1
