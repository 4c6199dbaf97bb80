"""The training run: `train(config) -> RunSummary`, what `solopo train` calls on every rank.

    initialize_parallel -> preflight (run lock, checkpoint to resume: training/resume.py) -> build_run
    (data, model, reference, optimizer, resume: training/setup.py) -> for each step: this DP rank's
    pairs from the sampler -> the run's Collator -> train_step -> divergence guard
    (training/divergence.py) -> log -> checkpoint every save_every steps and at the end -> RunSummary.

A run stops early, with a complete checkpoint, after `train.max_steps_per_run` steps, when the stop file
appears or on SIGTERM (training/signals.py); its summary (training/summary.py) then says
`finished=False` and `solopo train` exits with EXIT_RESUMABLE (75) so the job script can requeue it
with train.resume=auto. A diverged step stops the run with `TrainingDiverged`, without saving.
The setup (everything built before the first step) is training/setup.py.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from megatron_solopo.checkpoint import loader
from megatron_solopo.dataclass_yaml import save_config, to_dict
from megatron_solopo.parallel import destroy_parallel, initialize_parallel
from megatron_solopo.parallel.parallel_context import ParallelContext
from megatron_solopo.training import heldout, run_inputs
from megatron_solopo.training.diagnostics import HELDOUT_POINT
from megatron_solopo.training.divergence import DivergenceGuard, TrainingDiverged
from megatron_solopo.training.logging import MetricsLogger
from megatron_solopo.training.reference import attach_reference
from megatron_solopo.training.resume import preflight
from megatron_solopo.training.run_state import TrainState, save_checkpoint
from megatron_solopo.training.setup import Run, build_run
from megatron_solopo.training.signals import (EXIT_RESUMABLE, EXIT_STATUS_FILE_ENV, STOP_FILE_ENV, TermSignal,
                                              poll_stop_requests, remove_stop_file)
from megatron_solopo.training.step import NonFiniteGradError, NonFiniteLossError, train_step
from megatron_solopo.training.summary import SUMMARY_FILE, RunSummary, earlier_metrics, summarize

if TYPE_CHECKING:
    from megatron_solopo.config import ExperimentConfig

__all__ = ["EXIT_RESUMABLE", "EXIT_STATUS_FILE_ENV", "STOP_FILE_ENV", "SUMMARY_FILE", "RunSummary",
           "TrainingDiverged", "train"]


# ------------------------------------------------------------------------------------------ batches
def _next_indices(sampler, global_batch_pairs: int) -> list[int]:
    """This DP rank's dataset positions for the next step; an epoch's incomplete last batch is skipped."""
    if sampler.samples_per_epoch - sampler.position < global_batch_pairs:
        sampler.set_position(sampler.epoch + 1, 0)
    per_rank = global_batch_pairs // sampler.dp_size
    iterator = iter(sampler)
    return [next(iterator) for _ in range(per_rank)]


def _step_samples(run: Run) -> list[dict]:
    indices = [run.train_positions[i] for i in _next_indices(run.sampler, run.config.train.global_batch_pairs)]
    samples = [dict(run.dataset[i]) for i in indices]
    if run.reference_table is not None:
        attach_reference(samples, indices, run.reference_table)
    elif run.reference_scorer is not None:
        run.reference_scorer.annotate(samples)
    return samples


# ------------------------------------------------------------------------------------------ stepping
def _step_metrics(result, seconds: float, epoch: int) -> dict[str, Any]:
    """The step's record; `seconds` is the whole step, of which the diagnostics' extra pass is left out of
    step_time_s and tokens_per_s (logged apart as diag/extra_time_s), so timings stay comparable."""
    seconds -= result.diagnostic_seconds
    extra = {"diag/extra_time_s": result.diagnostic_seconds} if result.diagnostic_seconds else {}
    return {"loss": result.loss, **result.metrics, "grad_norm": result.grad_norm, "lr": result.lr,
            "step_time_s": seconds, "tokens_per_s": result.num_tokens / max(seconds, 1e-9),
            "tokens": result.num_tokens, "tokens/padded": result.num_padded_tokens,
            "tokens/response": result.num_response_tokens, "pairs": result.num_pairs,
            "update_skipped": 0.0 if result.update_successful else 1.0, "epoch": epoch, **extra}


def _guarded_step(run: Run, step: int, guard: DivergenceGuard):
    """One optimizer step, checked by the divergence guard before anything can save it: StepResult."""
    train = run.config.train
    samples = _step_samples(run)
    measure_share = train.ra_grad_share and (step % train.log_every == 0 or step == run.total_steps)
    microbatches = run.collator.microbatches(samples, run.config.objective)
    solo_share = measure_share and run.config.objective.mode == "solo"
    po_microbatches = run.collator.po_term_microbatches(samples, run.config.objective) if solo_share else None
    try:
        result = train_step(run.chunks, run.optimizer, run.scheduler, microbatches, run.config.objective,
                            run.collator.parallel, step, head=run.config.model.logprob_head,
                            diagnostics=train.diagnostics, ra_grad_share=measure_share,
                            po_microbatches=po_microbatches)
    except (NonFiniteLossError, NonFiniteGradError) as err:
        raise guard.step_failed(step, err, run.checkpoint) from err
    guard.check_update(step, [str(sample.get("id", "?")) for sample in samples], run.checkpoint)
    return result


def _steps(run: Run, metrics_logger: MetricsLogger, bar, term: TermSignal) -> tuple[int, str, dict]:
    """Steps from run.start_step to the last one or a stop request: (last step, stop reason, its metrics)."""
    train = run.config.train
    guard = DivergenceGuard(train, run.chunks, metrics_logger)
    step, last = run.start_step, {}
    while step < run.total_steps:
        step += 1
        started = time.perf_counter()
        result = _guarded_step(run, step, guard)
        file_stop, signal_stop, peak_gib = poll_stop_requests(term)
        budget_spent = train.max_steps_per_run is not None and step - run.start_step >= train.max_steps_per_run
        stop = (file_stop or signal_stop or budget_spent) and step < run.total_steps
        last = {**_step_metrics(result, time.perf_counter() - started, run.sampler.epoch), "peak_mem_gib": peak_gib}
        if step % train.log_every == 0 or step == run.total_steps or stop:
            metrics_logger.log(step, last)
        bar.update(1)
        bar.set_postfix(loss=f"{result.loss:.4f}", refresh=False)
        if (train.save_every and step % train.save_every == 0) or step == run.total_steps or stop:
            run.checkpoint = _save(run, step)
        if run.heldout is not None and train.heldout_every and step % train.heldout_every == 0 \
                and step < run.total_steps and not stop:
            _log_heldout(run, metrics_logger, step, "step")
        if file_stop:
            remove_stop_file()
        if stop:
            return step, "sigterm" if signal_stop else "stop_file" if file_stop else "max_steps_per_run", last
    return step, "finished", last


def _save(run: Run, step: int) -> str:
    import yaml


    model, plain = run.config.model, to_dict(run.config)
    metadata = {"preset": dataclasses.asdict(run.preset), "dtype": model.params_dtype,
                "source": model.hf_model or model.checkpoint or f"random init (seed {model.init_seed})"}
    state = TrainState(step=step, sampler=run.sampler.state_dict(), extra={"config": plain})
    path = save_checkpoint(run.config.train.output_dir, state,
                           run.chunks, run.optimizer, run.scheduler, keep_last=run.config.train.keep_last,
                           config_yaml=yaml.safe_dump(plain, sort_keys=False), tokenizer=run.tokenizer,
                           hf_config=loader.hf_config_of(model), metadata=metadata)
    return str(path)


def _log_heldout(run: Run, metrics_logger: MetricsLogger, step: int, point: str) -> dict[str, Any]:
    """Scores the held-out pairs with the current weights and logs them at `step` (collective). The
    "before" scores of the initial model are cached (heldout.before_cache_path: next to
    train.heldout_pairs_path, else in data.cache_dir): the arms of an experiment score them once."""
    model = run.config.model
    cache = (heldout.before_cache_path(run.heldout, run_inputs.model_identity(model, run.preset),
                                       run.config.data.cache_dir) if point == "before" else None)
    values = [heldout.read_before_cache(cache) if cache is not None and dist.get_rank() == 0 else None]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(values, src=0)
    values = values[0]
    if values is None:
        values = run.heldout.score(run.chunks, run.collator, head=model.logprob_head)
        if cache is not None and dist.get_rank() == 0:
            heldout.write_before_cache(cache, values)
    metrics_logger.log(step, {**values, HELDOUT_POINT: point}, console=False)
    if metrics_logger.enabled:
        metrics_logger.console(f"held-out pairs ({point}, step {step}): mean log-prob per token "
                               + ", ".join(f"{key.split('/', 1)[1].replace('_mean_logp', '')} {value:.4f}"
                                           for key, value in values.items() if key.endswith("_mean_logp")))
    return values


def _train_steps(run: Run, metrics_logger: MetricsLogger, bar) -> tuple[int, str, dict]:
    """The held-out scores before (fresh run) and after (finished run) around the steps."""
    if run.heldout is not None and run.start_step == 0:
        _log_heldout(run, metrics_logger, 0, "before")
    with TermSignal(run.config.train.sigterm_grace_s) as term:
        final_step, reason, last = _steps(run, metrics_logger, bar, term)
    if run.heldout is not None and final_step >= run.total_steps:
        _log_heldout(run, metrics_logger, final_step, "after")
    return final_step, reason, last


def _open_progress(run: Run, rank0: bool) -> tuple[MetricsLogger, Any]:
    """(metrics logger, progress bar) of this run; only rank 0's write anything."""
    from tqdm import tqdm


    train = run.config.train
    metrics_logger = MetricsLogger(pathlib.Path(train.output_dir), enabled=rank0, total_steps=run.total_steps,
                                   start_step=run.start_step, tensorboard=train.tensorboard, wandb=train.wandb,
                                   wandb_project=train.wandb_project, run_config=to_dict(run.config))
    bar = tqdm(total=run.total_steps, initial=run.start_step, disable=not rank0, desc="train", unit="step",
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
    metrics_logger.console = bar.write
    if rank0:
        bar.write(run.describe())
    return metrics_logger, bar


# ------------------------------------------------------------------------------------------ entry
def train(config: ExperimentConfig) -> RunSummary:
    """Runs (or resumes) training as configured; collective over all processes of the job.

    Sets up torch.distributed and Megatron's groups from the launcher's environment (torchrun/SLURM;
    a single process without one) unless they exist, and tears down what it created.
    """
    created = not dist.is_initialized()
    parallel = initialize_parallel(config.parallel, seed=config.train.seed)
    started = time.perf_counter()
    try:
        with preflight(config, parallel) as resume_from:  # rank 0 holds the run lock meanwhile
            return _run(config, parallel, resume_from, started)
    finally:
        if created:
            destroy_parallel()


def _run(config: ExperimentConfig, parallel: ParallelContext, resume_from: pathlib.Path | None,
         started: float) -> RunSummary:
    rank0 = dist.get_rank() == 0
    run = build_run(config, parallel, resume_from)
    finished_earlier = run.start_step >= run.total_steps
    if rank0 and not finished_earlier:  # only once every input loaded: a refused run leaves the old config
        save_config(config, pathlib.Path(config.train.output_dir) / "config.yaml")
    metrics_logger, bar = _open_progress(run, rank0)
    try:
        if finished_earlier:  # nothing to do: its config.yaml and run_summary.json stay as they are
            outcome = run.start_step, "already_finished", earlier_metrics(pathlib.Path(config.train.output_dir))
        else:
            outcome = _train_steps(run, metrics_logger, bar)
    finally:
        bar.close()
        metrics_logger.close()
    return summarize(run, outcome, started, rank0)
