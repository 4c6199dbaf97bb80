"""The training run: `train(config) -> RunSummary`, what `solopo train` calls on every rank.

    initialize_parallel -> architecture, tokenizer, tokenized pairs -> initial model (hf_model |
    checkpoint | random) -> reference (precomputed table | frozen copy | none) -> DDP + optimizer +
    schedule -> resume (train.resume) -> for each step: this DP rank's pairs from the sampler ->
    collate_microbatches -> train_step -> log -> checkpoint every save_every steps and at the end.

A run stops early, with a complete checkpoint, after `train.max_steps_per_run` steps or when the
file named by $SOLOPO_STOP_FILE appears (the SLURM scripts create it shortly before the time limit);
its summary then says `finished=False` and `solopo train` exits with EXIT_RESUMABLE (75) so the job
script can requeue it with train.resume=auto. A NaN/Inf loss or gradient stops the run with
`TrainingDiverged` naming the step and the pairs, before the optimizer step and without saving.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import sys
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megatron_solopo.objectives import needs_reference
from megatron_solopo.parallel.context import ParallelContext, fp8_seq_multiple
from megatron_solopo.checkpoint import loader
from megatron_solopo.training import runtime
from megatron_solopo.training.checkpointing import TrainState, load_checkpoint, resolve_resume, save_checkpoint
from megatron_solopo.training.logging import METRICS_FILE, MetricsLogger, peak_memory_gib

if TYPE_CHECKING:
    from megatron_solopo.config import ExperimentConfig

logger = logging.getLogger(__name__)

EXIT_RESUMABLE = 75
"""Exit status of `solopo train` when it stopped early with a checkpoint (run it again to continue)."""
STOP_FILE_ENV = "SOLOPO_STOP_FILE"
"""Environment variable naming a file whose appearance asks the run to save and stop at the next step."""
SUMMARY_FILE = "run_summary.json"


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN/Inf; nothing was saved for that step."""


@dataclasses.dataclass
class RunSummary:
    """What one `train` call did."""

    output_dir: str
    total_steps: int
    start_step: int
    """Step the run resumed from (0 = fresh)."""
    final_step: int
    """Last completed step (== total_steps when finished)."""
    stop_reason: str
    """finished | max_steps_per_run | stop_file | already_finished."""
    last_metrics: dict[str, Any]
    """The last step's metrics (empty if no step ran)."""
    checkpoint: str | None
    """The newest complete checkpoint."""
    wall_time_s: float
    metrics_path: str

    @property
    def finished(self) -> bool:
        return self.final_step >= self.total_steps

    @property
    def exit_code(self) -> int:
        """0 when the run reached its last step, EXIT_RESUMABLE when it stopped early with a checkpoint."""
        return 0 if self.finished else EXIT_RESUMABLE


@dataclasses.dataclass
class _Run:
    """Everything the step loop needs, built once by `_setup`."""

    config: ExperimentConfig
    dataset: Any
    tokenizer: Any
    preset: Any
    chunks: list
    optimizer: Any
    scheduler: Any
    sampler: Any
    layout: str
    total_steps: int
    start_step: int
    parallel: ParallelContext | None = None
    """This rank's parallel context (initialize_parallel's): sizes, ranks, groups."""
    reference_table: Any = None
    reference_scorer: Any = None
    checkpoint: str | None = None


# ------------------------------------------------------------------------------------------ setup
def _build_reference(config: ExperimentConfig, dataset, preset, layout: str, tokenizer, parallel: ParallelContext):
    """(table, scorer): the precomputed table (verified) or the frozen online model, or neither."""
    from megatron_solopo.training import reference as ref

    mode = config.train.resolve_reference(needs_reference(config.objective))
    roles = ref.reference_roles(config.objective)
    if mode == "precomputed":
        path = ref.resolve_reference_path(config.train, config.data)
        table = ref.ReferenceTable.from_file(path)
        table.verify(dataset, roles, runtime.model_identity(config.model, preset), where=str(path))
        return table, None
    if mode == "online":
        frozen = runtime.build_initial_model(config.model, config.parallel, preset)
        scorer = ref.ReferenceScorer(frozen, roles, parallel, layout, config.train.micro_batch_pairs,
                                     runtime.pad_token_id(tokenizer), preset.vocab_size,
                                     pad_to_multiple_of=fp8_seq_multiple(config.model.fp8, config.model.fp8_recipe),
                                     head=config.model.logprob_head)
        return None, scorer
    return None, None


def _build_optimization(config: ExperimentConfig, chunks: list, total_steps: int):
    from megatron_solopo.training.optim import build_training_objects

    train = config.train
    return build_training_objects(
        chunks, lr=train.lr, total_steps=total_steps, warmup_steps=train.warmup_steps, min_lr=train.min_lr,
        decay=train.lr_decay, weight_decay=train.weight_decay, adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2, adam_eps=train.adam_eps, clip_grad=train.clip_grad,
        use_distributed_optimizer=train.distributed_optimizer)


def _setup(config: ExperimentConfig, parallel: ParallelContext) -> _Run:
    from megatron_solopo.data.sampler import DistributedPairSampler
    from megatron_solopo.training.batching import resolve_layout

    train = config.train
    dp_rank, dp_size = parallel.dp_rank, parallel.dp_size
    train.num_microbatches(dp_size)  # fail before any loading when the batch does not split
    resume_from = resolve_resume(train.resume, train.output_dir)
    preset = loader.resolve_preset(config.model)
    tokenizer = runtime.load_run_tokenizer(config.model, preset)
    dataset = runtime.load_dataset(config.data, tokenizer)
    total_steps = train.total_steps(len(dataset))
    chunks = runtime.build_initial_model(config.model, config.parallel, preset, load_weights=resume_from is None)
    layout = resolve_layout(train.layout, runtime.attention_backend_of(chunks))
    table, scorer = _build_reference(config, dataset, preset, layout, tokenizer, parallel)
    chunks, optimizer, scheduler = _build_optimization(config, chunks, total_steps)
    sampler = DistributedPairSampler(len(dataset), dp_rank, dp_size, seed=train.seed)
    run = _Run(config, dataset, tokenizer, preset, chunks, optimizer, scheduler, sampler, layout, total_steps,
               start_step=0, parallel=parallel, reference_table=table, reference_scorer=scorer)
    loader.seed_everything(train.seed)  # after init_seed drew the weights: train's own RNG stream
    if resume_from is not None:  # restores the RNG states too (same layout)
        state = load_checkpoint(resume_from, chunks, optimizer, scheduler)
        sampler.load_state_dict(state.sampler)
        run.start_step, run.checkpoint = state.step, str(resume_from)
        _warn_about_changed_config(state.extra.get("config"), config, resume_from)
    return run


_RESUME_CHECKED_SECTIONS = ("model", "objective", "data")


def _warn_about_changed_config(saved: dict | None, config: ExperimentConfig, path) -> None:
    """Resuming with another model/objective/data is legal but usually a mistake (a reused output_dir)."""
    from megatron_solopo.config import to_dict

    if saved is None or dist.get_rank() != 0:
        return
    current = to_dict(config)
    changed = [f"{section}.{key}" for section in _RESUME_CHECKED_SECTIONS
               for key in sorted(set(saved.get(section, {})) | set(current[section]))
               if saved.get(section, {}).get(key) != current[section].get(key)]
    if changed:
        print(f"warning: resuming from {path}, which was trained with different {', '.join(changed)}; if this run "
              "is not meant to continue that one, use another train.output_dir or train.resume=none", file=sys.stderr)


# ------------------------------------------------------------------------------------------ batches
def _next_indices(sampler, global_batch_pairs: int) -> list[int]:
    """This DP rank's dataset positions for the next step; an epoch's incomplete last batch is skipped."""
    if sampler.samples_per_epoch - sampler.position < global_batch_pairs:
        sampler.set_position(sampler.epoch + 1, 0)
    per_rank = global_batch_pairs // sampler.dp_size
    iterator = iter(sampler)
    return [next(iterator) for _ in range(per_rank)]


def _step_samples(run: _Run) -> list[dict]:
    indices = _next_indices(run.sampler, run.config.train.global_batch_pairs)
    samples = [dict(run.dataset[i]) for i in indices]
    if run.reference_table is not None:
        from megatron_solopo.training.reference import attach_reference

        attach_reference(samples, indices, run.reference_table)
    elif run.reference_scorer is not None:
        run.reference_scorer.annotate(samples)
    return samples


def _microbatches(run: _Run, samples: list[dict]) -> list:
    from megatron_solopo.training.batching import collate_microbatches

    model = run.config.model
    return collate_microbatches(samples, run.config.objective, run.parallel, run.layout,
                                run.config.train.micro_batch_pairs, pad_token_id=runtime.pad_token_id(run.tokenizer),
                                vocab_size=run.preset.vocab_size,
                                pad_to_multiple_of=fp8_seq_multiple(model.fp8, model.fp8_recipe))


# ------------------------------------------------------------------------------------------ stepping
def _step_metrics(result, seconds: float, epoch: int) -> dict[str, Any]:
    return {"loss": result.loss, **result.metrics, "grad_norm": result.grad_norm, "lr": result.lr,
            "step_time_s": seconds, "tokens_per_s": result.num_tokens / max(seconds, 1e-9),
            "tokens": result.num_tokens, "tokens/padded": result.num_padded_tokens,
            "tokens/response": result.num_response_tokens, "pairs": result.num_pairs,
            "update_skipped": 0.0 if result.update_successful else 1.0, "epoch": epoch}


def _stop_requested_and_memory() -> tuple[bool, float]:
    """(the stop file exists on any rank, peak memory over all ranks in GiB): one small all-reduce."""
    stop_file = os.environ.get(STOP_FILE_ENV)
    requested = bool(stop_file) and os.path.exists(stop_file)
    flags = torch.tensor([float(requested), peak_memory_gib()],
                         device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0].item()), float(flags[1].item())


def _save(run: _Run, step: int) -> str:
    import yaml

    from megatron_solopo.config import to_dict

    model = run.config.model
    metadata = {"preset": dataclasses.asdict(run.preset), "dtype": model.params_dtype,
                "source": model.hf_model or model.checkpoint or f"random init (seed {model.init_seed})"}
    state = TrainState(step=step, sampler=run.sampler.state_dict(), extra={"config": to_dict(run.config)})
    path = save_checkpoint(run.config.train.output_dir, state,
                           run.chunks, run.optimizer, run.scheduler, keep_last=run.config.train.keep_last,
                           config_yaml=yaml.safe_dump(to_dict(run.config), sort_keys=False), tokenizer=run.tokenizer,
                           hf_config=loader.hf_config_of(model), metadata=metadata)
    return str(path)


def _diverged(err: Exception, run: _Run) -> TrainingDiverged:
    where = f"the last complete checkpoint is {run.checkpoint}" if run.checkpoint else "no checkpoint was saved yet"
    return TrainingDiverged(f"{err} Nothing was saved for this step; {where} (train.resume=auto continues from it; "
                            "consider a lower train.lr or train.clip_grad).")


def _progress_bar(run: _Run, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=run.total_steps, initial=run.start_step, disable=not enabled, desc="train", unit="step",
                dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)


def _loop(run: _Run, metrics_logger: MetricsLogger, bar) -> tuple[int, str, dict]:
    from megatron_solopo.training.step import NonFiniteGradError, NonFiniteLossError, train_step

    train = run.config.train
    step, last, reason = run.start_step, {}, "finished"
    steps_this_run = 0
    while step < run.total_steps:
        step += 1
        started = time.perf_counter()
        microbatches = _microbatches(run, _step_samples(run))
        try:
            result = train_step(run.chunks, run.optimizer, run.scheduler, microbatches, run.config.objective,
                                run.parallel, step, head=run.config.model.logprob_head)
        except (NonFiniteLossError, NonFiniteGradError) as err:
            metrics_logger.log(step, {"error": str(err), "sample_ids": list(err.sample_ids)}, console=False)
            raise _diverged(err, run) from err
        steps_this_run += 1
        file_stop, peak_gib = _stop_requested_and_memory()
        budget_spent = train.max_steps_per_run is not None and steps_this_run >= train.max_steps_per_run
        stop = (file_stop or budget_spent) and step < run.total_steps
        last = {**_step_metrics(result, time.perf_counter() - started, run.sampler.epoch), "peak_mem_gib": peak_gib}
        if step % train.log_every == 0 or step == run.total_steps or stop:
            metrics_logger.log(step, last)
        bar.update(1)
        bar.set_postfix(loss=f"{result.loss:.4f}", refresh=False)
        if (train.save_every and step % train.save_every == 0) or step == run.total_steps or stop:
            run.checkpoint = _save(run, step)
        if stop:
            reason = "stop_file" if file_stop else "max_steps_per_run"
            break
    return step, reason, last


def _describe(run: _Run, dp_size: int) -> str:
    config, preset = run.config, run.preset
    reference = ("precomputed" if run.reference_table is not None else "online" if run.reference_scorer is not None
                 else "none")
    resumed = f", resuming from {run.checkpoint} (step {run.start_step})" if run.checkpoint else ""
    return (f"SoLoPO training: {config.objective.name}/{config.objective.mode} on {len(run.dataset)} pairs, model "
            f"{preset.name} ({preset.num_parameters() / 1e6:.1f}M params, {config.model.params_dtype}), "
            f"tp={config.parallel.tp} pp={config.parallel.pp} cp={config.parallel.cp} dp={dp_size}, "
            f"{run.total_steps} steps x {config.train.global_batch_pairs} pairs, layout {run.layout}, "
            f"reference {reference}{resumed}")


# ------------------------------------------------------------------------------------------ entry
def train(config: ExperimentConfig) -> RunSummary:
    """Runs (or resumes) training as configured; collective over all processes of the job.

    Sets up torch.distributed and Megatron's groups from the launcher's environment (torchrun/SLURM;
    a single process without one) unless they exist, and tears down what it created.
    """
    from megatron_solopo.parallel import destroy_parallel, initialize_parallel

    created = not dist.is_initialized()
    parallel = initialize_parallel(config.parallel, seed=config.train.seed)
    try:
        return _train(config, parallel)
    finally:
        if created:
            destroy_parallel()


def _train(config: ExperimentConfig, parallel: ParallelContext) -> RunSummary:
    from megatron_solopo.config import save_config

    started = time.perf_counter()
    rank0 = dist.get_rank() == 0
    output_dir = pathlib.Path(config.train.output_dir)
    if rank0:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
    run = _setup(config, parallel)
    metrics_logger = MetricsLogger(output_dir, enabled=rank0, total_steps=run.total_steps, start_step=run.start_step,
                                   tensorboard=config.train.tensorboard, wandb=config.train.wandb,
                                   wandb_project=config.train.wandb_project, run_config=_plain(config))
    bar = _progress_bar(run, enabled=rank0)
    metrics_logger.console = bar.write
    if rank0:
        bar.write(_describe(run, parallel.dp_size))
    try:
        if run.start_step >= run.total_steps:
            final_step, reason, last = run.start_step, "already_finished", {}
        else:
            final_step, reason, last = _loop(run, metrics_logger, bar)
    finally:
        bar.close()
        metrics_logger.close()
    summary = RunSummary(output_dir=str(output_dir), total_steps=run.total_steps, start_step=run.start_step,
                         final_step=final_step, stop_reason=reason, last_metrics=last, checkpoint=run.checkpoint,
                         wall_time_s=time.perf_counter() - started, metrics_path=str(output_dir / METRICS_FILE))
    if rank0:
        record = {**dataclasses.asdict(summary), "finished": summary.finished}
        (output_dir / SUMMARY_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    return summary


def _plain(config: ExperimentConfig) -> dict[str, Any]:
    from megatron_solopo.config import to_dict

    return to_dict(config)
