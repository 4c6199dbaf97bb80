"""The SoLoPO training step on Megatron-Core: pipeline schedule, loss contract, metrics.

API (what the run loop calls)
-----------------------------
    from megatron_solopo.training.optim import build_training_objects        # DDP, optimizer, schedule
    from megatron_solopo.training.batching import Collator, layout_for_backend
    from megatron_solopo.training.step import train_step, forward_only

    parallel = initialize_parallel(parallel_config)    # ParallelContext: sizes, ranks, groups
    chunks, optimizer, scheduler = build_training_objects(build_model_chunks(preset, parallel, ...),
                                                          train_cfg, total_steps)
    collator = Collator.for_model(model_cfg, parallel, layout_for_backend(backend), micro_batch_pairs,
                                  pad_token_id=..., vocab_size=...)          # once per run
    microbatches = collator.microbatches(samples_of_this_dp_rank, objective_cfg)
    result = train_step(chunks, optimizer, scheduler, microbatches, objective_cfg, parallel, step_index)
    result.loss, result.metrics, result.grad_norm, result.lr, result.num_pairs, result.num_tokens
    # diagnostics=True adds diag/* (mean log-probs, pushes); ra_grad_share=True (solo) the RA gradient share
    # through one extra forward/backward of the PO term's sequences (po_microbatches:
    # collator.po_term_microbatches; training/diagnostics.py); the update is the same either way

    # reference precompute / eval: score any roles, no gradients
    scoring = collator.scoring_microbatches(samples, reference_roles)
    logps = forward_only(frozen_chunks, scoring, parallel)   # {sample_id: {role: log-prob sum}}

`train_step` raises `NonFiniteLossError` (on every rank, before the optimizer step) when a loss or
a log-prob sum is NaN/Inf, naming the step and the sample ids, and `NonFiniteGradError` when the
reduced gradients are (the parameters are then still those of the previous step).

Global normalization (Megatron-Core 0.19 contract, worked out from its sources)
------------------------------------------------------------------------------
Target: with N preference pairs in the global batch and per-pair loss l_p, the step's loss is
L = (1/N) sum_p l_p, and its gradient must not depend on the micro-batch size, the number of
micro-batches M, the DP size or the CP size. `optim.wrap_ddp` sets
`TransformerConfig.calculate_per_token_loss = True`, which selects this path through Megatron:

1. pipeline_parallel/schedules.py `forward_step_calc_loss`: our loss_func returns the 3-tuple
   (loss, count, report). With calculate_per_token_loss the loss is used as is: not divided by
   count nor by M, and not multiplied by the CP size (only the 2-tuple form is multiplied by
   cp / M; that is the trap of several DPO ports). `total_num_tokens += count`.
2. `backward_step` back-propagates `config.grad_scale_func(loss)` (= optimizer.scale_loss: 1 for
   fp32/bf16, the dynamic loss scale for fp16, divided out again by the optimizer).
3. distributed/distributed_data_parallel.py: with calculate_per_token_loss the bucket
   gradient_scaling_factor is 1, so gradients are SUMMED (not averaged) over the dp x cp group.
4. distributed/finalize_model_grads.py `finalize_model_grads(model, total_num_tokens)`: broadcasts
   the count from the last pipeline stage over PP, all-reduces it (SUM) over dp x cp and multiplies
   every gradient by 1 / max(count, 1).

What our loss_func does, on CP rank c of DP replica d, for micro-batch m with n_dm pairs: the head
returns s_c, the log-prob sums of the response tokens this rank holds; `cp_all_reduce_sum` gives
S = sum_c s_c (forward all-reduce, backward identity); loss_dm = sum_{p in (d,m)} l_p(S), the same
number on every CP rank; count = n_dm on CP rank 0 and 0 on the other CP ranks.
- Gradient on rank (d, c): dloss_dm/dS . ds_c/dtheta (ring attention routes the parts that flow
  through other ranks' keys/values back to them). Summed over c it is dloss_dm/dtheta exactly once,
  because every response token lies on exactly one CP rank and S = sum_c s_c.
- Step 3 sums over (d, c) and over the micro-batches: sum_{d,m} dloss_dm/dtheta = d(sum_p l_p)/dtheta.
- Step 4 divides by sum over (d, c, m) of count = sum_{d,m} n_dm = N (CP ranks other than 0 add 0).
Result: dL/dtheta for any micro-batch size, M, DP and CP. TP: every TP rank computes the same loss
(vocab-parallel cross-entropy all-reduces over TP) and Megatron's TP layers yield each rank's shard
of that one gradient. PP: the loss exists on the last stage; gradients reach earlier stages by p2p.
Tests: tests/training/test_step_parallel.py compares TP/PP/interleaved-PP/CP/DP/micro-batching layouts.

Metrics: each micro-batch's report holds sums over its pairs (objective metrics with
reduction="sum", the loss, pair/token counts), identical on its CP and TP ranks. train_step sums the
reports over micro-batches, all-reduces them over the data-parallel group WITHOUT CP (each replica
counted once, CP/TP copies not at all), divides by N (count metrics such as orpo/clamped stay
totals) and broadcasts the result from the last pipeline stage, so every rank returns the same values.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import torch
import torch.distributed as dist

from megatron_solopo.model.logprobs import LogprobHeadConfig, make_output_processor
from megatron_solopo.objectives import COUNT_METRICS, ObjectiveConfig, objective_loss
from megatron_solopo.parallel.parallel_context import ParallelContext, require_parallel_context
from megatron_solopo.parallel.cp import cp_all_reduce_sum
from megatron_solopo.parallel.device import compute_device
from megatron_solopo.training.batching import MicroBatch
from megatron_solopo.training.diagnostics import (
    capture_gradient,
    grad_share_unsupported,
    gradient_split,
    po_term_loss,
    sequence_diagnostics,
)
from megatron_solopo.training.optim import current_lr
from megatron_solopo.training.run_state import capture_rng_state, restore_rng_state

__all__ = [
    "NonFiniteGradError",
    "NonFiniteLossError",
    "StepResult",
    "forward_only",
    "make_forward_step",
    "train_step",
]

_COUNTS = ("pairs", "tokens/real", "tokens/padded", "tokens/response")


class NonFiniteLossError(FloatingPointError):
    """A loss or per-sequence log-prob sum is NaN/Inf; raised on every rank before the optimizer step."""

    def __init__(self, step_index: int, sample_ids: list[str]):
        self.step_index, self.sample_ids = step_index, sample_ids
        super().__init__(
            f"step {step_index}: non-finite loss or log-prob sums in the micro-batches holding samples "
            f"{sample_ids}; the optimizer step was not taken. Look for a diverged model (lower the lr, check "
            "the last checkpoint's loss) or a broken sample (empty/odd response masks).")


class NonFiniteGradError(FloatingPointError):
    """The reduced gradients contain NaN/Inf although the loss was finite; raised before the optimizer step."""

    def __init__(self, step_index: int, sample_ids: list[str]):
        self.step_index, self.sample_ids = step_index, sample_ids
        super().__init__(
            f"step {step_index}: the gradients contain NaN/Inf (the loss was finite); the optimizer step was not "
            f"taken. Samples of this step on this rank: {sample_ids}. Typical causes: fp16/bf16 overflow in the "
            "backward, or an lr that has already diverged the model.")


@dataclasses.dataclass
class StepResult:
    """One optimizer step, with globally reduced numbers (the same on every rank)."""

    step: int
    """Index of this step (the caller's step_index)."""
    loss: float
    """Mean loss over the global batch's pairs."""
    metrics: dict[str, float]
    """Objective metrics (loss/po, rewards/*, ra/distance, ...): per-pair means; counts are totals."""
    grad_norm: float | None
    """Global gradient L2 norm before clipping (None when the optimizer skipped the update)."""
    lr: float
    """Learning rate this step used."""
    num_pairs: int
    """Preference pairs in the global batch (over all DP ranks)."""
    num_tokens: int
    """Real (non-padding) tokens forwarded for the global batch, all sequences."""
    num_padded_tokens: int
    """Tokens the model processed including padding."""
    num_response_tokens: int
    """Response tokens scored by the LM head."""
    update_successful: bool
    """False when Megatron's optimizer skipped the update (fp16 overflow)."""
    num_zeros_in_grad: int | None = None
    """Zero gradient entries (only when the optimizer config logs them)."""
    diagnostic_seconds: float = 0.0
    """Seconds this call spent on the RA gradient share (its extra pass), not on the step itself."""


# ---------------------------------------------------------------------------------- forward step
@dataclasses.dataclass
class _StepState:
    """Per-schedule-call state shared by the forward step and the loss function."""

    objective: ObjectiveConfig | None
    processor: object
    cp_group: object
    cp_rank: int
    device: torch.device
    loss_flags: list[torch.Tensor] = dataclasses.field(default_factory=list)
    """Per micro-batch (last stage): a device bool, True when its log-prob sums or loss are NaN/Inf."""
    loss_flag_samples: list[list[str]] = dataclasses.field(default_factory=list)
    """The sample ids of each flagged micro-batch, in the same order."""
    diagnostics: bool = False
    """Add the diag/* sums of `diagnostics.sequence_diagnostics` to each micro-batch's report."""
    po_only: bool = False
    """The RA gradient share's extra pass: the loss is solo mode's loss without its RA term."""


def _device() -> torch.device:
    return compute_device()


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _forward_step(state: _StepState, data_iterator, model):
    """Megatron forward_step_func: runs one micro-batch; the last stage returns per-sequence log-prob sums."""
    microbatch: MicroBatch = next(data_iterator)
    on_device = microbatch.to(state.device)
    output = model(on_device.tokens, on_device.position_ids, None,
                   packed_seq_params=on_device.packed_seq_params,
                   output_processor=state.processor, output_processor_context=on_device.rows)
    return output, functools.partial(_loss_func, state, on_device)


def _loss_func(state: _StepState, microbatch: MicroBatch, sequence_logps_local: torch.Tensor,
               non_loss_data: bool = False):
    """(loss SUM over the micro-batch's pairs, pair count on CP rank 0 else 0, report of sums).

    With non_loss_data (forward_only): {"sample_ids", "roles", "logps" [n_pairs, n_roles]}.
    """
    sequence_logps = cp_all_reduce_sum(sequence_logps_local, state.cp_group)  # [n_seq], complete on every CP rank
    if non_loss_data:
        by_pair = sequence_logps.detach().float().view(microbatch.num_pairs, len(microbatch.roles))
        return {"sample_ids": microbatch.sample_ids, "roles": microbatch.roles, "logps": by_pair.cpu()}
    count = torch.tensor(microbatch.num_pairs if state.cp_rank == 0 else 0, dtype=torch.int, device=state.device)
    stats = microbatch.batch_stats(sequence_logps)
    if state.po_only:
        loss = po_term_loss(state.objective, stats)
        return loss, count, {"loss": loss.detach(), "pairs": microbatch.num_pairs}
    # objective_loss neither syncs nor raises on NaN/Inf (a raise on one rank would hang the others):
    # non-finite sums give a non-finite loss, flagged on the device and checked once per step
    loss, metrics = objective_loss(state.objective, stats, reduction="sum")
    if state.diagnostics:
        metrics = {**metrics, **sequence_diagnostics(state.objective, stats)}
    state.loss_flags.append(~torch.isfinite(loss.detach()) | ~torch.isfinite(sequence_logps.detach()).all())
    state.loss_flag_samples.append(microbatch.sample_ids)
    report = {"loss": loss.detach(), **metrics, "pairs": microbatch.num_pairs,
              "tokens/real": microbatch.num_real_tokens, "tokens/padded": microbatch.num_padded_tokens,
              "tokens/response": microbatch.num_response_tokens}
    return loss, count, report


def make_forward_step(objective: ObjectiveConfig | None, parallel: ParallelContext,
                      head: LogprobHeadConfig | None = None, *, diagnostics: bool = False, po_only: bool = False):
    """A Megatron `forward_step_func(data_iterator, model)` for micro-batches of `MicroBatch`.

    Returns (forward_step_func, state); the state collects non-finite flags during the schedule.
    objective=None: log-prob sums only (use with collect_non_loss_data=True, as forward_only does).
    parallel: this rank's ParallelContext (its CP group and rank reduce the log-prob sums).
    diagnostics: add the diag/* sums (training/diagnostics.py) to every report. po_only (solo mode):
    the loss is the objective without its SoLo-RA term (the RA gradient share's extra pass).
    """
    parallel = require_parallel_context(parallel, "make_forward_step")
    state = _StepState(objective=objective, processor=make_output_processor(head),
                       cp_group=parallel.cp_group, cp_rank=parallel.cp_rank, device=_device(),
                       diagnostics=diagnostics, po_only=po_only)
    return functools.partial(_forward_step, state), state


# ------------------------------------------------------------------------------------- checks
def _check_setup(model_chunks: list, microbatches: list[MicroBatch], parallel, where: str) -> ParallelContext:
    parallel = require_parallel_context(parallel, where)
    if not microbatches:
        raise ValueError("no micro-batches for this step (collate_microbatches returned none)")
    if not model_chunks:
        raise ValueError("no model chunks")
    model_groups = getattr(_unwrap(model_chunks[0]), "pg_collection", None)
    if parallel.pg_collection is not None and model_groups is not None and model_groups is not parallel.pg_collection:
        raise ValueError(f"{where}: the model chunks were built with other process groups than `parallel`; build "
                         "them with build_model_chunks(preset, parallel) after the initialize_parallel that "
                         "returned this ParallelContext")
    backend = getattr(_unwrap(model_chunks[0]), "attention_backend_name", None)
    if backend == "local" and any(mb.layout == "packed" for mb in microbatches):
        raise ValueError("Megatron's local attention does not take packed (THD) micro-batches; collate with "
                         "layout='padded' (layout_for_backend('local')) or use attention_backend sdpa/te")
    return parallel


def _data_iterator(model_chunks: list, microbatches: list[MicroBatch]):
    if len(model_chunks) == 1:
        return iter(microbatches)
    return [iter(microbatches) for _ in model_chunks]  # interleaved pipeline: one iterator per chunk


def _schedule(model_chunks, microbatches, forward_step_func, forward_only_: bool, collect_non_loss_data: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=_data_iterator(model_chunks, microbatches),
        model=model_chunks,
        num_microbatches=len(microbatches),
        # with variable_seq_lengths (builder) p2p exchanges shapes; these are the largest full shapes
        seq_length=max(mb.seq_len_tokens for mb in microbatches),
        micro_batch_size=max(mb.num_rows for mb in microbatches),
        forward_only=forward_only_,
        collect_non_loss_data=collect_non_loss_data,
    )


def _grads_finite(model_chunks: list) -> torch.Tensor:
    """1-element float tensor: 1.0 if any DDP grad buffer of this rank holds NaN/Inf.

    One fp32 sum per buffer (NaN/Inf anywhere makes it non-finite) instead of an isfinite mask the
    size of the gradients; a finite sum above 3.4e38 would read as Inf, i.e. as diverged, which it is.
    """
    bad = torch.zeros(1, device=_device())
    for chunk in model_chunks:
        for buffer in getattr(chunk, "buffers", []) + getattr(chunk, "expert_parallel_buffers", []):
            total = torch.sum(buffer.grad_data, dtype=torch.float32)
            bad = torch.maximum(bad, (~torch.isfinite(total)).float().view(1))
    return bad


def _raise_if_nonfinite(state: _StepState, model_chunks: list, microbatches: list[MicroBatch], step_index: int) -> None:
    """Collective: every rank learns whether any rank saw a non-finite loss or gradient, and raises."""
    loss_flags = (torch.stack(state.loss_flags) if state.loss_flags  # [n_microbatches] (last stage only)
                  else torch.zeros(0, dtype=torch.bool, device=_device()))
    flags = torch.cat([loss_flags.any().float().view(1), _grads_finite(model_chunks)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    loss_bad, grad_bad = (bool(x) for x in flags.tolist())  # the step's one host sync for these checks
    if loss_bad:
        mine = {sample for bad, ids in zip(loss_flags.tolist(), state.loss_flag_samples) if bad for sample in ids}
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(mine))
        raise NonFiniteLossError(step_index, sorted({sample for ids in gathered for sample in ids}))
    if grad_bad:
        raise NonFiniteGradError(step_index, [sample for mb in microbatches for sample in mb.sample_ids])


# ------------------------------------------------------------------------------------- metrics
def _reduce_reports(reports: list[dict], device: torch.device, parallel: ParallelContext) -> dict[str, float] | None:
    """Last pipeline stage: sums over micro-batches and DP replicas (not CP/TP copies); None elsewhere."""
    if not parallel.is_last_stage():
        return None
    keys = list(reports[0])
    for report in reports[1:]:
        if list(report) != keys:
            raise RuntimeError(f"micro-batch reports disagree on their keys: {keys} vs {list(report)}")
    totals = torch.stack([
        torch.stack([torch.as_tensor(report[key], dtype=torch.float64, device=device).reshape(()) for key in keys])
        for report in reports]).sum(dim=0)  # [n_keys]
    dist.all_reduce(totals, group=parallel.dp_group)  # data-parallel group without CP
    return dict(zip(keys, totals.tolist()))


def _broadcast_from_last_stage(value, parallel: ParallelContext):
    """The last pipeline stage's python object on every stage of this pipeline."""
    if parallel.pp_size == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=parallel.pp_last_rank, group=parallel.pp_group)
    return holder[0]


def _normalize(totals: dict[str, float]) -> tuple[float, dict[str, float], dict[str, int]]:
    pairs = totals["pairs"]
    counts = {key: round(totals[key]) for key in _COUNTS}
    metrics = {key: (value if key in COUNT_METRICS else value / pairs)
               for key, value in totals.items() if key not in _COUNTS and key != "loss"}
    return totals["loss"] / pairs, metrics, counts


# ------------------------------------------------------------------------------------- public API
def train_step(model_chunks: list, optimizer, scheduler, microbatches: list[MicroBatch],
               objective: ObjectiveConfig, parallel: ParallelContext, step_index: int,
               head: LogprobHeadConfig | None = None, *, diagnostics: bool = False,
               ra_grad_share: bool = False, po_microbatches: list[MicroBatch] | None = None) -> StepResult:
    """One optimizer step over this rank's micro-batches through Megatron's pipeline schedule.

    model_chunks: from optim.wrap_ddp (DDP-wrapped GPTModel chunks); optimizer/scheduler from
    optim.build_optimizer / build_scheduler (scheduler may be None: constant lr); microbatches: this
    DP rank's share of the global batch (Collator.microbatches), the same list on every TP/PP/CP rank
    of the replica; parallel: the ParallelContext from initialize_parallel. The loss is the mean over the
    global batch's pairs (module docstring). Collective: every rank of the job calls it with the same
    number of micro-batches per pipeline.

    diagnostics: also report the diag/* values of training/diagnostics.py (free: from the step's sums).
    ra_grad_share (solo mode): first run the loss minus its RA term over `po_microbatches` (the same pairs
    with only the sequences that term reads: `Collator.po_term_microbatches`; None: the step's own
    micro-batches, whose long sequences then cost a forward/backward without adding gradient), keep that
    gradient g_PO on the host, then take the real step and report ||g_RA|| = ||g - g_PO|| and the ratios
    (diagnostics.gradient_split). The real step starts from the same RNG states and parameters, so its
    gradient and update are those of a step without the measurement.
    """
    parallel = _check_setup(model_chunks, microbatches, parallel, "train_step")
    config = _unwrap(model_chunks[0]).config
    if not config.calculate_per_token_loss or config.finalize_model_grads_func is None:
        raise ValueError("the model chunks are not set up for training: wrap them with optim.wrap_ddp and build "
                         "the optimizer with optim.build_optimizer (they set calculate_per_token_loss and "
                         "finalize_model_grads_func, which the loss contract needs)")
    diagnostic_seconds, po_grads = 0.0, None
    if ra_grad_share and objective.mode == "solo" and grad_share_unsupported(optimizer) is None:
        started = time.perf_counter()
        po_grads = _po_gradient(model_chunks, optimizer, po_microbatches or microbatches, objective, parallel, head)
        diagnostic_seconds += time.perf_counter() - started
    _zero_grads(model_chunks, optimizer)
    forward_step_func, state = make_forward_step(objective, parallel, head, diagnostics=diagnostics)
    reports = _schedule(model_chunks, microbatches, forward_step_func, forward_only_=False,
                        collect_non_loss_data=False)
    _raise_if_nonfinite(state, model_chunks, microbatches, step_index)
    share = {}
    if po_grads is not None:
        started = time.perf_counter()
        share = gradient_split(optimizer, po_grads)
        del po_grads
        diagnostic_seconds += time.perf_counter() - started
    lr = current_lr(optimizer)
    update_successful, grad_norm, num_zeros = optimizer.step()
    if update_successful and scheduler is not None:
        scheduler.step(1)
    totals = _broadcast_from_last_stage(_reduce_reports(reports, state.device, parallel), parallel)
    loss, metrics, counts = _normalize(totals)
    return StepResult(step=step_index, loss=loss, metrics={**metrics, **share},
                      grad_norm=None if grad_norm is None else float(grad_norm), lr=lr,
                      num_pairs=counts["pairs"], num_tokens=counts["tokens/real"],
                      num_padded_tokens=counts["tokens/padded"], num_response_tokens=counts["tokens/response"],
                      update_successful=bool(update_successful),
                      num_zeros_in_grad=None if num_zeros is None else int(num_zeros),
                      diagnostic_seconds=diagnostic_seconds)


def _zero_grads(model_chunks: list, optimizer) -> None:
    for chunk in model_chunks:
        chunk.train()
        chunk.zero_grad_buffer()
    optimizer.zero_grad()


def _po_gradient(model_chunks: list, optimizer, microbatches: list[MicroBatch], objective: ObjectiveConfig,
                 parallel: ParallelContext, head: LogprobHeadConfig | None) -> list[list[torch.Tensor]]:
    """g_PO: the gradient of solo mode's loss without its RA term, through the same schedule, DDP reduction
    and 1 / pair count as the step (host copy). The RNG states are put back afterwards, so the real pass
    draws what it would have drawn without this one (dropout masks)."""
    rng = capture_rng_state()
    try:
        _zero_grads(model_chunks, optimizer)
        forward_step_func, _ = make_forward_step(objective, parallel, head, po_only=True)
        _schedule(model_chunks, microbatches, forward_step_func, forward_only_=False, collect_non_loss_data=False)
        return capture_gradient(optimizer)
    finally:
        restore_rng_state(rng)


def forward_only(model_chunks: list, microbatches: list[MicroBatch], parallel: ParallelContext,
                 head: LogprobHeadConfig | None = None) -> dict[str, dict[str, float]]:
    """Per-sample, per-role response log-prob sums of this rank's micro-batches, without gradients.

    For reference precompute (the frozen model) and evaluation. Runs Megatron's schedule with
    forward_only=True in eval mode (the chunks' train/eval mode is restored). Returns
    {sample_id: {role: log-prob sum}} for this DP rank's samples, the same on every TP/PP/CP rank of
    the replica (gather over DP with dist.all_gather_object if one rank writes them all).
    Collective over the model-parallel ranks of the replica; parallel: the ParallelContext from
    initialize_parallel.
    """
    parallel = _check_setup(model_chunks, microbatches, parallel, "forward_only")
    modes = [chunk.training for chunk in model_chunks]
    forward_step_func, _ = make_forward_step(None, parallel, head)
    try:
        for chunk in model_chunks:
            chunk.eval()
        with torch.no_grad():
            outputs = _schedule(model_chunks, microbatches, forward_step_func, forward_only_=True,
                                collect_non_loss_data=True)
    finally:
        for chunk, mode in zip(model_chunks, modes):
            chunk.train(mode)
    result = None
    if parallel.is_last_stage():
        result = {}
        for out in outputs:
            for sample_id, row in zip(out["sample_ids"], out["logps"].tolist()):
                result[sample_id] = dict(zip(out["roles"], row))
    return _broadcast_from_last_stage(result, parallel)

