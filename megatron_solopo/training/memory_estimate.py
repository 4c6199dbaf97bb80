"""Per-GPU memory LOWER BOUND of a training layout (pure arithmetic) and the layout checks of a config.

The per-GPU memory a user sees comes from ONE place: the dry run of the real training step
(megatron_solopo/plan/, `solopo plan`, `tools/plan_layout.py`, the SLURM scripts' `--dry-run`). This module
keeps only what is cheap and safe: the layout checks (`plan_layout`: world size, heads, vocab, batch split)
and a lower bound on the bytes one rank must hold at once, which the layout search (plan/search.py) uses to
skip dry runs that cannot fit, and which `tools/plan_layout.py` falls back to (labelled as a bound) where
the dry run cannot go (a padded layout, a short-only objective mode). tests/plan/test_search.py checks that
the bound never exceeds the dry run's peak.

Terms (bytes per GPU, each one a floor):

* weights, gradients, optimizer: per-GPU parameter count P (the transformer layers / (tp*pp), plus
  the vocab-parallel embedding on the first stage and the output layer on the last). Mixed
  precision (bf16/fp16): 2 B weights, 4 B fp32 gradient buffer (Megatron accumulates and all-reduces
  gradients in fp32 for bf16) and 12 B optimizer state (fp32 master copy, Adam m and v); fp32 keeps
  4 + 4 + 8. With the distributed optimizer the optimizer state is sharded over dp*cp.
* activations: what each layer has saved for the backward when the backward starts, per token, with a
  memory-linear attention kernel (SDPA / flash: no [s, s] scores), SwiGLU MLP and no dropout:
  2-byte activations x [4h (norm and linear inputs; split over tp only with sequence parallelism)
  + (q + k + v + attention output + gate/up + SwiGLU output) / tp]
  = b * [4h / (tp if SP else 1) + (2*a*d + 2*g*d + 3f) / tp], a = heads, g = kv heads, d = head dim.
  Full (and, as a floor, selective) recompute keeps only each layer's input (b * h / (tp if SP else 1)).
  Tokens per GPU are the micro-batch's tokens / cp; the first pipeline stage holds min(pp, micro-batches)
  micro-batches of its layers.
* not counted (the dry run counts them): the layer being differentiated, recomputed activations, the
  LM head's chunks, communication temporaries, RoPE tables; nor what neither counts (CUDA context, NCCL,
  allocator fragmentation: docs/scaling.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from megatron_solopo.model.presets import ModelPreset
from megatron_solopo.parallel.config import ParallelConfig

if TYPE_CHECKING:
    from megatron_solopo.config import ExperimentConfig

__all__ = ["GIB", "SequencePlan", "MemoryEstimate", "LayoutPlan", "params_per_gpu",
           "activation_bytes_per_token_per_layer", "estimate_memory", "memory_lower_bound", "format_estimate",
           "sequence_plan_from_config", "plan_layout"]

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class SequencePlan:
    """The token lengths of one preference pair's sequences (context + response each)."""

    names: tuple[str, ...]
    """Sequence names, e.g. ("short_chosen", "short_rejected", "long_chosen")."""
    tokens: tuple[int, ...]
    """Tokens of each sequence (prompt + response + EOS), same order as names."""
    response_tokens: int
    """Response tokens per sequence (where log-probs are computed)."""

    def __post_init__(self) -> None:
        if len(self.names) != len(self.tokens) or not self.names:
            raise ValueError("SequencePlan needs one token count per sequence name (and at least one sequence)")

    def tokens_per_pair(self, packed: bool) -> int:
        """Tokens one pair puts through the model: the sum (packed) or n x the longest (padded)."""
        return sum(self.tokens) if packed else len(self.tokens) * max(self.tokens)


@dataclasses.dataclass
class MemoryEstimate:
    """Lower bound of the bytes per GPU by term (most loaded pipeline stage) and what it was computed from."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    """Activations saved by the layers the stage holds when the backward starts (a floor)."""
    params_per_gpu: int
    tokens_per_microbatch_per_gpu: int
    layers_held: float
    """Layer-microbatches whose activations the first stage holds at the peak."""
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def as_gib(self) -> dict[str, float]:
        out = {k: round(getattr(self, k) / GIB, 2) for k in ("weights", "gradients", "optimizer", "activations")}
        out["total"] = round(self.total / GIB, 2)
        return out


def _layer_params(preset: ModelPreset) -> tuple[int, int]:
    """(parameters split by TP, parameters replicated on every TP rank) of one transformer layer."""
    h, f, d = preset.hidden_size, preset.ffn_hidden_size, preset.head_dim
    a, g = preset.num_attention_heads, preset.num_query_groups
    qkv = h * d * (a + 2 * g) + (d * (a + 2 * g) if preset.qkv_bias else 0)
    split = qkv + a * d * h + 3 * h * f
    return split, 2 * h  # the two RMSNorm weights are replicated


def params_per_gpu(preset: ModelPreset, parallel: ParallelConfig) -> int:
    """Parameters on the most loaded GPU: first stage (embedding) or last stage (output layer)."""
    split, replicated = _layer_params(preset)
    layers = preset.num_layers // parallel.pp
    body = layers * (split // parallel.tp + replicated)
    vocab_shard = preset.vocab_size * preset.hidden_size // parallel.tp
    first = body + vocab_shard
    # tied embeddings: one matrix at pp=1; at pp>1 the last stage keeps a synchronized copy
    output_layer = vocab_shard if (not preset.tie_embeddings or parallel.pp > 1) else 0
    last = body + output_layer + preset.hidden_size
    if parallel.pp == 1:
        return body + vocab_shard + (0 if preset.tie_embeddings else vocab_shard) + preset.hidden_size
    return max(first, last)


def activation_bytes_per_token_per_layer(preset: ModelPreset, parallel: ParallelConfig, act_bytes: int,
                                         recompute: str) -> float:
    """Bytes one layer keeps for backward per token on one GPU (formula in the module docstring)."""
    h, f, d = preset.hidden_size, preset.ffn_hidden_size, preset.head_dim
    a, g = preset.num_attention_heads, preset.num_query_groups
    replicated_div = parallel.tp if parallel.sequence_parallel else 1
    if recompute == "full":
        return act_bytes * h / replicated_div
    return act_bytes * (4 * h / replicated_div + (2 * a * d + 2 * g * d + 3 * f) / parallel.tp)


def memory_lower_bound(preset: ModelPreset, parallel: ParallelConfig, world_size: int, sequences: SequencePlan, *,
                       micro_batch_pairs: int, num_microbatches: int, params_dtype: str = "bf16",
                       recompute: str = "none", distributed_optimizer: bool = True,
                       packed: bool = True) -> MemoryEstimate:
    """Bytes one GPU must hold at once to train `preset` with this layout (a floor: module docstring).

    Args:
        world_size: total GPUs of the job (dp = world / (tp*pp*cp)).
        sequences: the sequences of one preference pair (which ones follows from the objective).
        micro_batch_pairs / num_microbatches: pairs per forward and micro-batches per step per rank.
        params_dtype: fp32 | bf16 | fp16 (bf16/fp16 train with fp32 master weights).
        recompute: none | selective | full (selective is floored like full).
        packed: sequences of a micro-batch packed in one row (THD) rather than padded to the longest.
    """
    dp = parallel.dp_size(world_size)
    notes: list[str] = []
    params = params_per_gpu(preset, parallel)
    mixed = params_dtype in ("bf16", "fp16")
    weight_bytes, grad_bytes, optim_bytes = (2, 4, 12) if mixed else (4, 4, 8)
    shard = dp * parallel.cp if distributed_optimizer else 1
    if distributed_optimizer and shard == 1:
        notes.append("distributed optimizer with dp*cp = 1 shards nothing")
    act_bytes = 2 if mixed else 4
    tokens_mb = micro_batch_pairs * sequences.tokens_per_pair(packed)
    tokens_gpu = tokens_mb // parallel.cp
    floor_mode = "none" if recompute == "none" else "full"
    per_token_layer = activation_bytes_per_token_per_layer(preset, parallel, act_bytes, floor_mode)
    layers_held = preset.num_layers // parallel.pp * min(parallel.pp, num_microbatches)
    return MemoryEstimate(weights=params * weight_bytes, gradients=params * grad_bytes,
                          optimizer=params * optim_bytes / shard, activations=per_token_layer * tokens_gpu * layers_held,
                          params_per_gpu=params, tokens_per_microbatch_per_gpu=tokens_gpu, layers_held=layers_held,
                          notes=notes)


estimate_memory = memory_lower_bound
"""Former name (the analytical estimate it replaced is gone: the dry run gives the one answer)."""


def format_estimate(est: MemoryEstimate, gpu_memory_bytes: float, params_dtype: str, recompute: str,
                    distributed_optimizer: bool, shard: int) -> Sequence[str]:
    """The lower bound's terms as aligned text lines (GiB)."""
    gib = est.as_gib()
    mixed = params_dtype in ("bf16", "fp16")
    rows = [
        (f"weights ({params_dtype}, {est.params_per_gpu / 1e9:.2f}B params on this GPU)", gib["weights"]),
        (f"gradients ({'fp32 main grads' if mixed else 'fp32'})", gib["gradients"]),
        (f"optimizer ({'fp32 master + ' if mixed else ''}Adam m, v"
         + (f"; distributed over dp*cp={shard})" if distributed_optimizer else "; not sharded)"), gib["optimizer"]),
        ((f"saved activations, floor (recompute={recompute}, {est.tokens_per_microbatch_per_gpu} tokens/GPU/"
          f"micro-batch, {est.layers_held:g} layer-micro-batches held)"), gib["activations"]),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"  {name:<{width}}  {value:8.2f} GiB" for name, value in rows]
    total = est.total
    verdict = "lower bound fits" if total <= gpu_memory_bytes else "DOES NOT FIT (even the lower bound)"
    lines.append(f"  {'lower bound total':<{width}}  {total / GIB:8.2f} GiB of {gpu_memory_bytes / GIB:.0f} GiB -> "
                 f"{verdict}")
    return lines


# ------------------------------------------------------------------------------------------ configs
_TEMPLATE_TOKENS = 32
"""Chat-template tokens around a prompt (role headers, BOS): a small allowance added per sequence."""


def sequence_plan_from_config(config: ExperimentConfig) -> SequencePlan:
    """The longest sequences one pair of this experiment can have (upper bounds from the data section).

    Short prompt: data.short_max_tokens; long prompt: max(data.long_target_tokens) * (1 + tolerance);
    response: data.max_new_tokens + EOS; plus a chat-template allowance per sequence.
    """
    from megatron_solopo.objectives import required_sequences

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
    """The analytical LOWER BOUND (memory_lower_bound); the per-GPU figure is the dry run's (plan/)."""
    gpu_memory_bytes: float
    lines: list[str]
    """The layout's description (job, layout, model, objective, batch); tools/plan_layout.py adds the dry run."""

    @property
    def fits(self) -> bool:
        """False only when even the lower bound exceeds the GPU memory (necessary, not sufficient: the dry run
        decides; tools/plan_layout.py)."""
        return self.estimate.total <= self.gpu_memory_bytes


def plan_layout(config: ExperimentConfig, preset: ModelPreset, nodes: int, gpus_per_node: int, gpu_memory_gib: float = 80.0) -> LayoutPlan:
    """Checks that the experiment's parallel section fits the job and bounds per-GPU memory from below.

    Raises ValueError naming the problem when the GPU count is not a multiple of tp*pp*cp, the global
    batch does not split over the data-parallel ranks, or the model cannot be split this way.
    """
    from megatron_solopo.objectives import needs_reference

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


def _plan_lines(config: ExperimentConfig, preset: ModelPreset, par: ParallelConfig, nodes: int, gpus_per_node: int, dp: int,
                num_mb: int, sequences: SequencePlan, packed: bool) -> list[str]:
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
