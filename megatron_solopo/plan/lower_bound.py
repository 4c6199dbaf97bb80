"""Per-GPU memory LOWER BOUND of a training layout: pure arithmetic, no torch.

The per-GPU memory a user sees comes from ONE place: the dry run of the real training step
(plan/dry_run.py, `solopo plan`, `tools/plan_layout.py`, the SLURM scripts' `--dry-run`). This module keeps
only what is cheap and safe: a lower bound on the bytes one rank must hold at once, which the layout search
(plan/search.py) uses to skip dry runs that cannot fit, and which a config's layout check (plan/layout.py,
`tools/plan_layout.py`) falls back to (labelled as a bound) where the dry run cannot go (a padded layout, a
short-only objective mode). tests/plan/test_search.py checks that the bound never exceeds the dry run's peak.

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
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_solopo.model.presets import ModelPreset
    from megatron_solopo.parallel.config import ParallelConfig

__all__ = ["GIB", "SequencePlan", "MemoryEstimate", "params_per_gpu", "activation_bytes_per_token_per_layer",
           "memory_lower_bound", "format_estimate"]

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
