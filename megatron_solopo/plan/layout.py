"""A config's layout checked against a job, and its per-GPU memory planned: what `tools/plan_layout.py` and the
SLURM scripts' `--dry-run` print (the command: commands/plan.py, `PlanLayout`).

`plan_layout` checks the experiment's parallel section against a job of nodes x GPUs (world size, heads,
vocab, the batch split over the data-parallel ranks) and bounds the per-GPU memory from below
(plan/lower_bound.py). `memory_lines` gives the per-GPU memory of the real training step of rank 0 of that
layout: the dry run on fake tensors at 2 and 4 layers extrapolated to the model's depth (plan/search.py,
`scaled_plan`; with pipeline parallelism the first and the last stage, the larger peak decides). A layout
fits when that peak is at most 90% of the GPU's memory (the rest is kept for what the dry run does not
count: CUDA context, NCCL, allocator fragmentation). Where the dry run cannot plan a config (a padded
layout, another objective mode: `dry_run_spec` says why) only the lower bound is printed, labelled as such.
The functions take the composed config; loading one is the command's job (config.py sits above plan/).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import TYPE_CHECKING

from megatron_solopo.checkpoint.loader import resolve_preset
from megatron_solopo.model.presets import get_preset
from megatron_solopo.objectives import needs_reference, required_sequences
from megatron_solopo.plan.dry_run import PlanSpec
from megatron_solopo.plan.lower_bound import GIB, MemoryEstimate, SequencePlan, format_estimate, memory_lower_bound
from megatron_solopo.plan.search import Assumptions, scaled_plan

if TYPE_CHECKING:
    from megatron_solopo.config import ExperimentConfig
    from megatron_solopo.model.presets import ModelPreset
    from megatron_solopo.parallel.config import ParallelConfig

__all__ = ["LayoutPlan", "sequence_plan_from_config", "plan_layout", "preset_for", "dry_run_spec", "memory_lines"]

_TEMPLATE_TOKENS = 32
"""Chat-template tokens around a prompt (role headers, BOS): a small allowance added per sequence."""


def sequence_plan_from_config(config: ExperimentConfig) -> SequencePlan:
    """The longest sequences one pair of this experiment can have (upper bounds from the data section).

    Short prompt: data.short_max_tokens; long prompt: max(data.long_target_tokens) * (1 + tolerance);
    response: data.max_new_tokens + EOS; plus a chat-template allowance per sequence.
    """
    data = config.data
    response = data.max_new_tokens + 1
    short = data.short_max_tokens + _TEMPLATE_TOKENS + response
    long = math.ceil(max(data.long_target_tokens) * (1 + data.long_length_tolerance)) + _TEMPLATE_TOKENS + response
    names = tuple(sorted(required_sequences(config.objective)))
    tokens = tuple(long if name.startswith("long") else short for name in names)
    return SequencePlan(names, tokens, response)


@dataclasses.dataclass
class LayoutPlan:
    """A parallel layout for a job of `nodes` x `gpus_per_node` GPUs and its memory estimate."""

    preset: ModelPreset
    parallel: ParallelConfig
    nodes: int
    gpus_per_node: int
    dp: int
    num_microbatches: int
    sequences: SequencePlan
    estimate: MemoryEstimate
    """The analytical LOWER BOUND (memory_lower_bound); the per-GPU figure is the dry run's (memory_lines)."""
    gpu_memory_bytes: float
    lines: list[str]
    """The layout's description (job, layout, model, objective, batch); memory_lines adds the dry run."""

    @property
    def fits(self) -> bool:
        """False only when even the lower bound exceeds the GPU memory (necessary, not sufficient: the dry run
        decides; memory_lines)."""
        return self.estimate.total <= self.gpu_memory_bytes


def plan_layout(config: ExperimentConfig, preset: ModelPreset, nodes: int, gpus_per_node: int,
                gpu_memory_gib: float = 80.0) -> LayoutPlan:
    """Checks that the experiment's parallel section fits the job and bounds per-GPU memory from below.

    Raises ValueError naming the problem when the GPU count is not a multiple of tp*pp*cp, the global
    batch does not split over the data-parallel ranks, or the model cannot be split this way.
    """
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"nodes ({nodes}) and gpus_per_node ({gpus_per_node}) must be >= 1")
    par, train, model = config.parallel, config.train, config.model
    world = nodes * gpus_per_node
    par.check_model(preset.num_layers, preset.num_attention_heads, preset.num_query_groups, preset.vocab_size)
    dp = par.dp_size(world)
    num_mb = train.num_microbatches(dp)
    sequences = sequence_plan_from_config(config)
    packed = train.layout != "padded"
    online = train.resolve_reference(needs_reference(config.objective)) == "online"
    dtype = model.params_dtype
    est = memory_lower_bound(preset, par, world, sequences, micro_batch_pairs=train.micro_batch_pairs,
                             num_microbatches=num_mb, params_dtype=dtype, recompute=model.recompute,
                             distributed_optimizer=train.distributed_optimizer, packed=packed)
    if online:
        est.notes.append("an online frozen reference copy adds its weights (not in the bound)")
    memory = gpu_memory_gib * GIB
    lines = _plan_lines(config, preset, par, nodes, gpus_per_node, dp, num_mb, sequences, packed)
    return LayoutPlan(preset, par, nodes, gpus_per_node, dp, num_mb, sequences, est, memory, lines)


def _plan_lines(config: ExperimentConfig, preset: ModelPreset, par: ParallelConfig, nodes: int, gpus_per_node: int,
                dp: int, num_mb: int, sequences: SequencePlan, packed: bool) -> list[str]:
    world = nodes * gpus_per_node
    lines = [f"job: {nodes} node(s) x {gpus_per_node} GPUs = {world} GPUs",
             f"layout: TP={par.tp} PP={par.pp}" + (f" (virtual {par.virtual_pp})" if par.virtual_pp else "")
             + f" CP={par.cp} DP={dp}   (one model replica = tp*pp*cp = {par.model_parallel_size} GPUs"
             + (", sequence parallel" if par.sequence_parallel else "") + ")"]
    if par.tp > gpus_per_node:
        lines.append(f"  warning: TP={par.tp} spans nodes ({gpus_per_node} GPUs per node): TP all-reduces every "
                     "layer and needs NVLink; keep TP within a node and scale with CP/PP/DP across nodes")
    elif par.tp * par.cp > gpus_per_node and par.cp > 1:
        lines.append(f"  CP ring crosses nodes (TP*CP = {par.tp * par.cp} > {gpus_per_node}): K/V blocks travel "
                     "over the inter-node network, overlapped with attention compute")
    lines.append(f"model: {preset.name} ({preset.num_parameters() / 1e9:.2f}B params; {preset.num_layers} layers, "
                 f"hidden {preset.hidden_size}, ffn {preset.ffn_hidden_size}, heads {preset.num_attention_heads}/"
                 f"{preset.num_query_groups}, vocab {preset.vocab_size}); dtype {config.model.params_dtype}, "
                 f"recompute {config.model.recompute}, attention {config.model.attention_backend}")
    obj = config.objective
    seqs = ", ".join(f"{n} {t}" for n, t in zip(sequences.names, sequences.tokens))
    lines.append(f"objective: {obj.name} mode={obj.mode}; per pair (tokens, prompt + response): {seqs}")
    lines.append(f"batch: global {config.train.global_batch_pairs} pairs = micro-batch {config.train.micro_batch_pairs}"
                 f" x {num_mb} accumulation steps x DP {dp}; "
                 f"{sequences.tokens_per_pair(packed) * config.train.micro_batch_pairs} tokens per micro-batch "
                 f"({'packed' if packed else 'padded'})")
    return lines


# ------------------------------------------------------------------------------------------ dry run
def preset_for(config: ExperimentConfig, name: str | None) -> ModelPreset:
    """The preset to plan with: `name` (--preset), else what the trainer would use (model.hf_model's
    config.json, model.checkpoint's marker, else model.preset)."""
    if name:
        return get_preset(name)
    hf_model = config.model.hf_model
    if hf_model and not (pathlib.Path(hf_model) / "config.json").is_file():
        raise ValueError(f"model.hf_model={hf_model} has no config.json here; pass --preset NAME "
                         "(e.g. smollm2-135m, qwen2.5-7b, llama3.1-8b) to plan without the checkpoint")
    return resolve_preset(config.model)


def dry_run_spec(config: ExperimentConfig, preset: ModelPreset, dp: int,
                 num_microbatches: int) -> tuple[PlanSpec | None, str | None]:
    """The PlanSpec of rank 0 of this config's layout (None + the reason when the dry run cannot plan it).

    With PP, the micro-batches planned are the step's, at most 2 x pp x vpp: the schedule's warm-up keeps at
    most pp (interleaved: about 2 x pp x vpp) of them in flight, so more do not raise the peak."""
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


def memory_lines(plan: LayoutPlan, spec: PlanSpec | None, reason: str | None, gpu_memory_gib: float,
                 config: ExperimentConfig) -> tuple[list[str], bool]:
    """The per-GPU memory of `plan` as text lines, and whether it fits (module docstring): the dry run of
    `spec`, or with no spec the lower bound, labelled as such, with `reason`."""
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


def _tips(config: ExperimentConfig, activation_share: float, plan: LayoutPlan) -> list[str]:
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
