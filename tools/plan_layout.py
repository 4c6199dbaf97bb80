#!/usr/bin/env python
"""Dry run: print the TP/PP/CP/DP layout and the per-GPU memory of one training step for a config, launch nothing.

    python tools/plan_layout.py --config examples/configs/recipes/llama3.1-8b-128k/solo-orpo.yaml \
        --nodes 2 --gpus-per-node 8 [--gpu-memory-gib 80] [--preset llama3.1-8b] [section.key=value ...]

The memory is `solopo plan`'s: the real training step of rank 0 of the layout, run on fake tensors in this
one CPU process at 2 and 4 layers and extrapolated to the model's depth (megatron_solopo/plan/, exact:
docs/scaling.md). A layout fits when that peak is at most 90% of --gpu-memory-gib (the rest is kept for what
the dry run does not count: CUDA context, NCCL, allocator fragmentation). With pipeline parallelism both
the first stage (which holds the most micro-batches in flight) and the last (which holds the LM head) are
planned, and the larger peak decides. Where the dry run cannot plan a config (padded layout, another
objective mode) only the analytical lower bound (training/memory_estimate.py) is printed, labelled as such.
Exit status 0 when it fits, 3 when it does not, 2 for a config error (message on stderr).
Needs only the package's Python dependencies (no GPU, no process group), so it runs on a login node
(~20-40 s for an 8B model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import TYPE_CHECKING

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

if TYPE_CHECKING:
    from megatron_solopo.config import ExperimentConfig


def _preset_for(config: ExperimentConfig, name: str | None):
    """--preset, else what the trainer would use (model.hf_model's config.json, model.checkpoint's
    marker, else model.preset)."""
    from megatron_solopo.checkpoint.loader import resolve_preset
    from megatron_solopo.model.presets import get_preset

    if name:
        return get_preset(name)
    hf_model = config.model.hf_model
    if hf_model and not (pathlib.Path(hf_model) / "config.json").is_file():
        raise ValueError(f"model.hf_model={hf_model} has no config.json here; pass --preset NAME "
                         "(e.g. smollm2-135m, qwen2.5-7b, llama3.1-8b) to plan without the checkpoint")
    return resolve_preset(config.model)


def _dry_run_spec(config: ExperimentConfig, preset, dp: int, num_microbatches: int):
    """The PlanSpec of rank 0 of this config's layout (None + the reason when the dry run cannot plan it).

    With PP, the micro-batches planned are the step's, at most 2 x pp x vpp: the schedule's warm-up keeps at
    most pp (interleaved: about 2 x pp x vpp) of them in flight, so more do not raise the peak."""
    from megatron_solopo.objectives import needs_reference
    from megatron_solopo.plan import PlanSpec
    from megatron_solopo.training.memory_estimate import sequence_plan_from_config

    par, train, model, objective = config.parallel, config.train, config.model, config.objective
    if objective.mode not in ("solo", "long", "expand_long"):
        return None, f"objective.mode={objective.mode}: the dry run plans solo and long-context pairs only"
    if train.layout == "padded":
        return None, "train.layout=padded: the dry run plans packed micro-batches"
    sequences = sequence_plan_from_config(config)
    response = sequences.response_tokens
    lengths = dict(zip(sequences.names, sequences.tokens))
    long = max(t for n, t in lengths.items() if n.startswith("long")) - response
    short = max((t for n, t in lengths.items() if n.startswith("short")), default=response + 1) - response
    name = "orpo" if needs_reference(objective) else objective.name  # reference log-probs: per-pair scalars
    microbatches = 1 if par.pp == 1 else min(num_microbatches, 2 * par.pp * (par.virtual_pp or 1))
    spec = PlanSpec(preset=preset.name, tp=par.tp, pp=par.pp, virtual_pp=par.virtual_pp, cp=par.cp,
                    sequence_parallel=par.sequence_parallel, dp=dp if train.distributed_optimizer else 1,
                    short_tokens=short, long_tokens=long, response_tokens=response,
                    mode="solo" if objective.mode == "solo" else "long", objective=name,
                    recompute=model.recompute, params_dtype=model.params_dtype,
                    micro_batch_pairs=train.micro_batch_pairs, num_microbatches=microbatches,
                    distributed_optimizer=train.distributed_optimizer)
    return spec, None


def _memory_lines(plan, spec, reason, gpu_memory_gib: float, config: ExperimentConfig) -> tuple[list[str], bool]:
    from megatron_solopo.plan.memory import GIB
    from megatron_solopo.plan.search import Assumptions, scaled_plan
    from megatron_solopo.training.memory_estimate import format_estimate

    memory = gpu_memory_gib * GIB
    if spec is None:
        lines = [f"per-GPU memory: no dry run ({reason}); analytical LOWER BOUND only, not an estimate:"]
        lines += format_estimate(plan.estimate, memory, config.model.params_dtype, config.model.recompute,
                                 config.train.distributed_optimizer, plan.dp * plan.parallel.cp)
        lines += [f"  note: {n}" for n in plan.estimate.notes]
        fits = plan.fits
        if not fits:
            lines += [f"  try: {t}" for t in _tips(config, plan.estimate.activations / plan.estimate.total, plan)]
        return lines, fits
    reserve = Assumptions().reserve_fraction
    stages = [scaled_plan(spec)]
    if spec.pp > 1:
        stages.append(scaled_plan(dataclasses.replace(spec, stage="last")))
    result = max(stages, key=lambda stage: stage.peak_bytes)
    which = "" if spec.pp == 1 else f", {'first' if result is stages[0] else 'last'} pipeline stage (the larger)"
    usable = memory * (1 - reserve)
    rows = [(name, value) for name, value in result.persistent_bytes.items()]
    rows.append(("activations+temporaries (incl. the LM head, response positions only)", result.activations_bytes))
    width = max(len(name) for name, _ in rows)
    lines = [f"per-GPU memory: dry run of one training step (fake tensors{which}; solopo plan, docs/scaling.md):"]
    lines += [f"  {name:<{width}}  {value / GIB:8.2f} GiB" for name, value in rows]
    fits = result.peak_bytes <= usable
    verdict = "fits" if fits else "DOES NOT FIT"
    lines.append(f"  {'total (peak, ' + result.peak_phase + ')':<{width}}  {result.peak_bytes / GIB:8.2f} GiB of "
                 f"{gpu_memory_gib:.0f} GiB ({usable / GIB:.1f} usable: {reserve:.0%} kept for CUDA context, NCCL, "
                 f"fragmentation) -> {verdict}")
    notes = []
    if spec.pp > 1:
        notes.append(f"first stage peak {stages[0].peak_bytes / GIB:.2f} GiB, last stage "
                     f"{stages[1].peak_bytes / GIB:.2f} GiB ({spec.num_microbatches} micro-batches planned)")
    if spec.objective != config.objective.name:
        notes.append(f"planned with {spec.objective}: {config.objective.name}'s reference log-probs are "
                     "per-pair scalars" + (" (an online reference copy adds its weights)"
                                           if config.train.reference == "online" else ""))
    if spec.pp == 1:
        notes.append(f"one micro-batch of {spec.micro_batch_pairs} pair(s) planned; at PP=1 the step's "
                     f"{plan.num_microbatches} micro-batches run one after another with the same peak")
    notes.append(f"dry run at {result.layers[0]} and {result.layers[1]} layers extrapolated to "
                 f"{plan.preset.num_layers}: {sum(stage.seconds for stage in stages):.0f} s")
    lines += [f"  note: {n}" for n in notes]
    if not fits:
        share = result.activations_bytes / result.peak_bytes
        lines += [f"  try: {t}" for t in _tips(config, share, plan)]
    return lines, fits


def _tips(config: ExperimentConfig, activation_share: float, plan) -> list[str]:
    """What to change when a layout does not fit (most effective first)."""
    par, tips = config.parallel, []
    if config.model.recompute != "full" and activation_share > 0.3:
        tips.append("model.recompute=full (keeps one hidden state per layer instead of all activations)")
    if activation_share > 0.3:
        tips.append(f"parallel.cp={par.cp * 2} (halves the tokens per GPU; needs 2x the GPUs)")
    if not config.train.distributed_optimizer:
        tips.append("train.distributed_optimizer=true (shards fp32 master weights and Adam states over dp*cp)")
    if par.tp * 2 <= plan.gpus_per_node:
        tips.append(f"parallel.tp={par.tp * 2} (splits weights, gradients and optimizer state further)")
    tips.append("or search the layouts: solopo plan --preset NAME --short S --long L --gpus N --gpu-memory-gib M")
    return tips


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML (a recipe)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes in the job (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    parser.add_argument("--preset", help="model preset to plan with (default: from the config)")
    parser.add_argument("--json", action="store_true", help="also print the estimate as JSON (GiB)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    args = parser.parse_args(argv)

    from megatron_solopo.console import mute_dependency_warnings

    mute_dependency_warnings()  # as `solopo` does: SOLOPO_SHOW_WARNINGS=1 shows them
    from megatron_solopo.config import load_config
    from megatron_solopo.training.memory_estimate import plan_layout

    try:
        config = load_config(args.config, args.overrides)
        preset = _preset_for(config, args.preset)
        plan = plan_layout(config, preset, args.nodes, args.gpus_per_node, args.gpu_memory_gib)
        spec, reason = _dry_run_spec(config, preset, plan.dp, plan.num_microbatches)
    except (ValueError, FileNotFoundError) as err:
        print(f"plan_layout: {err}", file=sys.stderr)
        return 2
    print(f"config: {args.config}")
    print("\n".join(plan.lines), flush=True)
    try:
        lines, fits = _memory_lines(plan, spec, reason, args.gpu_memory_gib, config)
    except (ValueError, NotImplementedError) as err:
        print(f"plan_layout: dry run: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    if args.json:
        print(json.dumps({"tp": plan.parallel.tp, "pp": plan.parallel.pp, "cp": plan.parallel.cp, "dp": plan.dp,
                          "fits": fits, "dry_run": spec is not None, "lower_bound_gib": plan.estimate.as_gib()}))
    return 0 if fits else 3


if __name__ == "__main__":
    sys.exit(main())
