"""The training run: `train(config) -> RunSummary`, what `solopo train` calls on every rank.

    initialize_parallel -> architecture, tokenizer, tokenized pairs -> initial model (hf_model |
    checkpoint | random) -> reference (precomputed table | frozen copy | none) -> DDP + optimizer +
    schedule -> resume (train.resume) -> for each step: this DP rank's pairs from the sampler ->
    collate_microbatches -> train_step -> log -> checkpoint every save_every steps and at the end.

A run stops early, with a complete checkpoint, after `train.max_steps_per_run` steps or when the
file named by $SOLOPO_STOP_FILE appears (the SLURM scripts create it shortly before the time limit;
it is removed once honoured) or the process gets SIGTERM (within train.sigterm_grace_s);
its summary then says `finished=False` and `solopo train` exits with EXIT_RESUMABLE (75) so the job
script can requeue it with train.resume=auto (rank 0 also writes that status to $SOLOPO_EXIT_STATUS_FILE:
torchrun turns a worker's 75 into its own 1). A NaN/Inf loss or gradient stops the run with
`TrainingDiverged` naming the step and the pairs, before the optimizer step and without saving; so does
an update that makes the parameters non-finite or grows their norm by more than
train.max_param_norm_growth in one step (checked before any save, so no checkpoint ever holds a
diverged model). The error names the last good checkpoint and the command that continues it with a
lower lr (schedule settings may change on resume).

Before anything is written, rank 0 takes output_dir/.solopo_train.lock (a second run into the same
directory refuses) and compares the checkpoint to resume with this run's config: another objective,
data, model or global batch is refused unless train.resume=force.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megatron_solopo.objectives import needs_reference
from megatron_solopo.parallel.context import ParallelContext, fp8_seq_multiple
from megatron_solopo.checkpoint import loader
from megatron_solopo.training import runtime
from megatron_solopo.training.checkpointing import (
    CheckpointError,
    TrainState,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from megatron_solopo.training.logging import METRICS_FILE, MetricsLogger, peak_memory_gib

if TYPE_CHECKING:
    from megatron_solopo.config import ExperimentConfig

logger = logging.getLogger(__name__)

EXIT_RESUMABLE = 75
"""Exit status of `solopo train` when it stopped early with a checkpoint (run it again to continue)."""
STOP_FILE_ENV = "SOLOPO_STOP_FILE"
"""Environment variable naming a file whose appearance asks the run to save and stop at the next step."""
SUMMARY_FILE = "run_summary.json"
EXIT_STATUS_FILE_ENV = "SOLOPO_EXIT_STATUS_FILE"
"""Environment variable naming a file where rank 0 records the run's exit status (first line: 0 or
EXIT_RESUMABLE) once training returned: a launcher such as torchrun reports any non-zero worker status as
its own 1, so the SLURM scripts read this file to tell a resumable stop (requeue) from a failure."""


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
    """finished | max_steps_per_run | stop_file | sigterm | already_finished."""
    last_metrics: dict[str, Any]
    """The last step's metrics (empty if no step ran)."""
    checkpoint: str | None
    """The newest complete checkpoint."""
    wall_time_s: float
    metrics_path: str
    diagnostics: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Summary of the diagnostics (training/diagnostics.summarize_metrics): held-out means before and
    after training, the mean RA gradient share, the diag/* values of the first and last logged step."""
    train_pairs: int = 0
    """Distinct pairs the run draws its batches from (the pairs file less the held-out pairs)."""

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
    train_positions: Any = None
    """Dataset positions that train (all but the held-out pairs); the sampler draws indices into it."""
    heldout: Any = None
    """The held-out pairs (diagnostics.HeldOut) or None (train.heldout_pairs = 0)."""


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


def _setup(config: ExperimentConfig, parallel: ParallelContext, resume_from: pathlib.Path | None) -> _Run:
    from megatron_solopo.data.sampler import DistributedPairSampler
    from megatron_solopo.training.batching import resolve_layout

    train = config.train
    dp_rank, dp_size = parallel.dp_rank, parallel.dp_size
    preset = loader.resolve_preset(config.model)
    tokenizer = runtime.load_run_tokenizer(config.model, preset)
    dataset = runtime.load_dataset(config.data, tokenizer)
    heldout, train_positions = _split_heldout(config, dataset, tokenizer)
    try:
        total_steps = train.total_steps(len(train_positions))
    except ValueError as err:
        held = f", less the {train.heldout_pairs} held-out pairs" if heldout is not None else ""
        raise ValueError(f"{err} (data.pairs_path={config.data.pairs_path}{held})") from None
    if resume_from is not None:
        _check_not_past_the_end(config, resume_from, total_steps)
    chunks = runtime.build_initial_model(config.model, config.parallel, preset, load_weights=resume_from is None)
    layout = resolve_layout(train.layout, runtime.attention_backend_of(chunks))
    table, scorer = _build_reference(config, dataset, preset, layout, tokenizer, parallel)
    chunks, optimizer, scheduler = _build_optimization(config, chunks, total_steps)
    sampler = DistributedPairSampler(len(train_positions), dp_rank, dp_size, seed=train.seed)
    run = _Run(config, dataset, tokenizer, preset, chunks, optimizer, scheduler, sampler, layout, total_steps,
               start_step=0, parallel=parallel, reference_table=table, reference_scorer=scorer,
               train_positions=train_positions, heldout=heldout)
    loader.seed_everything(train.seed)  # after init_seed drew the weights: train's own RNG stream
    if resume_from is not None:  # restores the RNG states too (same layout)
        state = load_checkpoint(resume_from, chunks, optimizer, scheduler)
        sampler.load_state_dict(state.sampler)
        run.start_step, run.checkpoint = state.step, str(resume_from)
    if run.start_step < total_steps:  # room for a checkpoint, before the first step (again before each save)
        from megatron_solopo.training.checkpointing import check_checkpoint_space

        check_checkpoint_space(train.output_dir, chunks, optimizer)
    return run


def _split_heldout(config: ExperimentConfig, dataset, tokenizer):
    """(diagnostics.HeldOut | None, the dataset positions left for training): train.heldout_pairs."""
    from megatron_solopo.training.diagnostics import select_heldout

    def load_source(path: str):
        return runtime.load_dataset(dataclasses.replace(config.data, pairs_path=path), tokenizer)

    return select_heldout(config.train.heldout_pairs, config.train.heldout_pairs_path, dataset, load_source,
                          training_path=config.data.resolved_pairs_path)


def _check_not_past_the_end(config: ExperimentConfig, resume_from: pathlib.Path, total_steps: int) -> None:
    """A run shorter than the checkpoint it continues would report "finished" without training: refused."""
    from megatron_solopo.training.checkpointing import read_checkpoint_info

    step = read_checkpoint_info(resume_from).get("step")
    if isinstance(step, int) and step > total_steps:
        train = config.train
        setting = f"train.steps={train.steps}" if train.steps is not None else f"train.epochs={train.epochs}"
        raise CheckpointError(f"{setting} gives {total_steps} steps, but {resume_from} is already at step {step}; "
                              f"to continue that run give more than {step} steps, or use a new train.output_dir")


# ------------------------------------------------------------------------------------------ preflight
_MATH_SECTIONS = ("model", "objective", "data")
"""Config sections whose every key changes what is trained (except those in _NEUTRAL_KEYS)."""
_MATH_TRAIN_KEYS = ("global_batch_pairs", "reference", "reference_path", "seed", "heldout_pairs", "heldout_pairs_path")
_NEW_TRAIN_KEYS = ("heldout_pairs", "heldout_pairs_path")
"""Math keys that configs written before they existed lack: such a run used the key's default."""
_NEUTRAL_KEYS = {"model.attention_backend", "model.recompute", "model.recompute_num_layers", "model.logprob_head",
                 "model.tokenizer", "data.cache_dir", "data.output_dir", "data.sampling_backend"}
_SCHEDULE_KEYS = ("lr", "min_lr", "warmup_steps", "lr_decay", "weight_decay", "clip_grad", "adam_beta1",
                  "adam_beta2", "adam_eps", "steps", "epochs", "max_param_norm_growth")
"""train.* settings that may change on resume (logged): how the optimizer continues, not what it trains."""
LOCK_FILE = ".solopo_train.lock"
"""In output_dir while a run trains there: {"host", "pid"} of its rank 0 (a second run refuses to start)."""


def _differences(saved: dict, current: dict, keys: list[str]) -> list[tuple[str, Any, Any]]:
    out = []
    for dotted in keys:
        section, key = dotted.split(".", 1)
        old, new = saved.get(section, {}).get(key), current.get(section, {}).get(key)
        if old != new:
            out.append((dotted, old, new))
    return out


def _with_new_train_defaults(saved: dict) -> dict:
    from megatron_solopo.training.config import TrainConfig

    train = dict(saved.get("train", {}))
    defaults = TrainConfig()
    for key in _NEW_TRAIN_KEYS:
        train.setdefault(key, getattr(defaults, key))
    return {**saved, "train": train}


def compare_with_checkpoint_config(saved: dict, current: dict) -> tuple[list[str], list[tuple[str, Any, Any]]]:
    """(math keys that differ, [(schedule key, saved, current)]) between a checkpoint's config and this run's."""
    math_keys = [f"{section}.{key}" for section in _MATH_SECTIONS
                 for key in sorted(set(saved.get(section, {})) | set(current.get(section, {})))]
    math_keys = [key for key in math_keys if key not in _NEUTRAL_KEYS] + [f"train.{k}" for k in _MATH_TRAIN_KEYS]
    saved, current = _with_new_train_defaults(saved), _with_new_train_defaults(current)
    differing = [key for key, _, _ in _differences(saved, current, math_keys)]
    schedule = _differences(saved, current, [f"train.{k}" for k in _SCHEDULE_KEYS])
    return differing, schedule


def _read_checkpoint_config(path: pathlib.Path) -> dict | None:
    import yaml

    from megatron_solopo.checkpoint.format import CONFIG_FILE

    file = path / CONFIG_FILE
    if not file.is_file():
        return None
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
        raise CheckpointError(f"{file} cannot be read ({err}); the checkpoint {path} is damaged") from None
    return data if isinstance(data, dict) else None


def _check_resume_config(config: ExperimentConfig, resume_from: pathlib.Path) -> None:
    """Refuses to continue a checkpoint trained with another objective/data/model/global batch unless
    train.resume=force; prints what changed in the schedule (allowed)."""
    from megatron_solopo.config import to_dict

    if config.train.steps is not None:  # before anything is printed about the schedule (epochs: in _setup)
        _check_not_past_the_end(config, resume_from, config.train.steps)
    saved = _read_checkpoint_config(resume_from)
    if saved is None:
        return
    differing, schedule = compare_with_checkpoint_config(saved, to_dict(config))
    if differing and config.train.resume != "force":
        raise CheckpointError(
            f"{resume_from} was trained with a different {', '.join(differing)} than this run; refusing to continue "
            f"it (train.resume={config.train.resume}): use another train.output_dir for a new run, or "
            "train.resume=force to continue that run with this config")
    if differing:
        print(f"warning: train.resume=force: continuing {resume_from} although {', '.join(differing)} differ",
              file=sys.stderr)
    if schedule:
        print(f"resuming from {resume_from} with a changed schedule: "
              + ", ".join(f"{key} {old} -> {new}" for key, old, new in schedule), file=sys.stderr)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_run_lock(output_dir: pathlib.Path) -> pathlib.Path:
    """Creates output_dir/.solopo_train.lock for this process; CheckpointError when a live run holds it.

    A lock left by a dead process on this host is taken over with a warning; a lock of another host is
    never taken over (the message says how to remove it once that job is gone).
    """
    import socket

    lock = output_dir / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text(encoding="utf-8"))
                host, pid = str(owner["host"]), int(owner["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                host, pid = "?", -1
            if host == me["host"] and (pid == me["pid"] or not _pid_alive(pid)):
                if pid != me["pid"]:
                    print(f"warning: taking over {lock}: its owner (pid {pid} on {host}) is no longer running",
                          file=sys.stderr)
                lock.unlink(missing_ok=True)
                continue
            raise CheckpointError(
                f"{output_dir} is in use by another training run (pid {pid} on host {host}, lock file {lock}); "
                "wait for it to finish or use another train.output_dir (delete the lock file only if that run "
                "is gone)") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        return lock
    raise CheckpointError(f"could not create the lock file {lock}; another run keeps recreating it")


def _preflight(config: ExperimentConfig, parallel: ParallelContext) -> tuple[pathlib.Path | None, pathlib.Path | None]:
    """(checkpoint to resume from, the lock file this process holds) -- decided on rank 0, shared by all.

    Nothing in output_dir is written or deleted before these checks pass (except the lock).
    """
    train = config.train
    decision: list[Any] = [None, None]
    lock = None
    if dist.get_rank() == 0:
        try:
            train.num_microbatches(parallel.dp_size)  # fail before any loading when the batch does not split
            output_dir = pathlib.Path(train.output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            lock = acquire_run_lock(output_dir)
            resume_from = resolve_resume(train.resume, train.output_dir)
            if resume_from is not None:
                _check_resume_config(config, resume_from)
            decision = [None if resume_from is None else str(resume_from), None]
        except (CheckpointError, ValueError, OSError) as err:
            if lock is not None:
                lock.unlink(missing_ok=True)
            decision = [None, f"{type(err).__name__}\0{err}"]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(decision, src=0)
    if decision[1] is not None:
        kind, message = decision[1].split("\0", 1)
        raise (ValueError if kind == "ValueError" else CheckpointError)(message)
    return (None if decision[0] is None else pathlib.Path(decision[0])), lock


# ------------------------------------------------------------------------------------------ batches
def _next_indices(sampler, global_batch_pairs: int) -> list[int]:
    """This DP rank's dataset positions for the next step; an epoch's incomplete last batch is skipped."""
    if sampler.samples_per_epoch - sampler.position < global_batch_pairs:
        sampler.set_position(sampler.epoch + 1, 0)
    per_rank = global_batch_pairs // sampler.dp_size
    iterator = iter(sampler)
    return [next(iterator) for _ in range(per_rank)]


def _step_samples(run: _Run) -> list[dict]:
    indices = [run.train_positions[i] for i in _next_indices(run.sampler, run.config.train.global_batch_pairs)]
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
    """The step's record; `seconds` is the whole step, of which the diagnostics' extra pass is left out of
    step_time_s and tokens_per_s (logged apart as diag/extra_time_s), so timings stay comparable."""
    seconds -= result.diagnostic_seconds
    extra = {"diag/extra_time_s": result.diagnostic_seconds} if result.diagnostic_seconds else {}
    return {"loss": result.loss, **result.metrics, "grad_norm": result.grad_norm, "lr": result.lr,
            "step_time_s": seconds, "tokens_per_s": result.num_tokens / max(seconds, 1e-9),
            "tokens": result.num_tokens, "tokens/padded": result.num_padded_tokens,
            "tokens/response": result.num_response_tokens, "pairs": result.num_pairs,
            "update_skipped": 0.0 if result.update_successful else 1.0, "epoch": epoch, **extra}


class _TermSignal:
    """SIGTERM (what SLURM and Kubernetes send before a kill) asks the run to save at the next step boundary,
    like the stop file. If the process has not finished `grace_s` seconds after the signal, it terminates
    its own child processes (dist_checkpointing's multiprocessing manager) and exits with 128 + SIGTERM
    without a new checkpoint, so nothing of it outlives the grace period. Installed only in the main thread."""

    def __init__(self, grace_s: float):
        self.grace_s, self.received, self._previous = grace_s, False, None

    def __enter__(self) -> _TermSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.received:
            return
        self.received = True
        print(f"SIGTERM received: saving a checkpoint at the end of this step (train.sigterm_grace_s = "
              f"{self.grace_s:g} s)", file=sys.stderr, flush=True)
        timer = threading.Timer(self.grace_s, self._expire)
        timer.daemon = True
        timer.start()

    @staticmethod
    def _expire() -> None:
        import multiprocessing

        print("SIGTERM grace period (train.sigterm_grace_s) over before the checkpoint was saved; exiting without "
              "one", file=sys.stderr, flush=True)
        for child in multiprocessing.active_children():
            child.terminate()
        os._exit(128 + signal.SIGTERM)


def _stop_requested_and_memory(term: _TermSignal | None = None) -> tuple[bool, bool, float]:
    """(the stop file exists on any rank, SIGTERM reached any rank, peak memory over all ranks in GiB): one
    small all-reduce."""
    stop_file = os.environ.get(STOP_FILE_ENV)
    requested = bool(stop_file) and os.path.exists(stop_file)
    signalled = term is not None and term.received
    flags = torch.tensor([float(requested), float(signalled), peak_memory_gib()],
                         device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0].item()), bool(flags[1].item()), float(flags[2].item())


def _remove_stop_file() -> None:
    """The stop file has been honoured (checkpoint saved): remove it so the requeued job runs on."""
    stop_file = os.environ.get(STOP_FILE_ENV)
    if stop_file and dist.get_rank() == 0:
        try:
            os.remove(stop_file)
        except FileNotFoundError:
            pass
        except OSError as err:
            print(f"warning: could not remove the stop file {stop_file}: {err}", file=sys.stderr)


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


def _recovery_hint(run: _Run) -> str:
    """Where to go back to after a divergence: the last good checkpoint and the command continuing it."""
    train = run.config.train
    config_file = pathlib.Path(train.output_dir) / "config.yaml"
    lower = f"{min(train.lr / 10, 1e-4):.3g}"  # a tenth of this run's lr, at most 1e-4
    if run.checkpoint is None:
        return (f"no checkpoint was saved yet; start again with a lower learning rate: solopo train --config "
                f"{config_file} train.lr={lower}")
    return (f"the last good checkpoint is {run.checkpoint}; continue from it with a lower learning rate: "
            f"solopo train --config {config_file} train.resume={run.checkpoint} train.lr={lower}")


def _diverged(err: Exception, run: _Run) -> TrainingDiverged:
    return TrainingDiverged(f"{err} Nothing was saved for this step; {_recovery_hint(run)}")


def parameter_norm(chunks: list) -> float:
    """Global L2 norm of the model's parameters (every rank's local shards; replicas counted once per rank,
    which does not matter for the growth ratio the divergence guard uses). Collective."""
    squares = torch.zeros((), dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    for chunk in chunks:
        for param in chunk.parameters():
            squares += param.detach().double().pow(2).sum().to(squares.device)
    dist.all_reduce(squares)
    return float(squares.sqrt().item())


def _check_update(run: _Run, step: int, before: float, after: float, sample_ids: list[str]) -> None:
    """TrainingDiverged when the step's update made the weights non-finite or exploded their norm."""
    limit = run.config.train.max_param_norm_growth
    finite = after == after and after not in (float("inf"), float("-inf"))
    if finite and not (limit and before > 0 and after > limit * before):
        return
    what = ("made the parameters non-finite" if not finite else
            f"grew the parameter L2 norm from {before:.4g} to {after:.4g} (more than train.max_param_norm_growth = "
            f"{limit:g} times)")
    raise TrainingDiverged(f"step {step}: the optimizer update {what}; samples of this step: {sample_ids}. The "
                           f"model diverged (learning rate too high?). Nothing was saved for this step; "
                           f"{_recovery_hint(run)}")


def _progress_bar(run: _Run, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=run.total_steps, initial=run.start_step, disable=not enabled, desc="train", unit="step",
                dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)


def _loop(run: _Run, metrics_logger: MetricsLogger, bar) -> tuple[int, str, dict]:
    with _TermSignal(run.config.train.sigterm_grace_s) as term:
        return _steps(run, metrics_logger, bar, term)


def _steps(run: _Run, metrics_logger: MetricsLogger, bar, term: _TermSignal) -> tuple[int, str, dict]:
    from megatron_solopo.training.step import NonFiniteGradError, NonFiniteLossError, train_step

    train = run.config.train
    step, last, reason = run.start_step, {}, "finished"
    steps_this_run = 0
    norm = parameter_norm(run.chunks)
    while step < run.total_steps:
        step += 1
        started = time.perf_counter()
        samples = _step_samples(run)
        microbatches = _microbatches(run, samples)
        try:
            result = train_step(run.chunks, run.optimizer, run.scheduler, microbatches, run.config.objective,
                                run.parallel, step, head=run.config.model.logprob_head,
                                diagnostics=train.diagnostics,
                                ra_grad_share=train.ra_grad_share and (step % train.log_every == 0
                                                                       or step == run.total_steps))
        except (NonFiniteLossError, NonFiniteGradError) as err:
            metrics_logger.log(step, {"error": str(err), "sample_ids": list(err.sample_ids)}, console=False)
            raise _diverged(err, run) from err
        # the guard runs before any save: a checkpoint only ever holds the result of a sane step
        new_norm = parameter_norm(run.chunks)
        sample_ids = [str(sample.get("id", "?")) for sample in samples]
        try:
            _check_update(run, step, norm, new_norm, sample_ids)
        except TrainingDiverged as err:
            metrics_logger.log(step, {"error": str(err), "sample_ids": sample_ids, "param_norm": new_norm},
                               console=False)
            raise
        norm = new_norm
        steps_this_run += 1
        file_stop, signal_stop, peak_gib = _stop_requested_and_memory(term)
        budget_spent = train.max_steps_per_run is not None and steps_this_run >= train.max_steps_per_run
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
            _remove_stop_file()
        if stop:
            reason = "sigterm" if signal_stop else "stop_file" if file_stop else "max_steps_per_run"
            break
    return step, reason, last


def _log_heldout(run: _Run, metrics_logger: MetricsLogger, step: int, point: str) -> dict[str, Any]:
    """Scores the held-out pairs with the current weights and logs them at `step` (collective). The
    "before" scores of the initial model are cached (diagnostics.before_cache_path: next to
    train.heldout_pairs_path, else in data.cache_dir): the arms of an experiment score them once."""
    from megatron_solopo.training import diagnostics

    model = run.config.model
    cache = (diagnostics.before_cache_path(run.heldout, runtime.model_identity(model, run.preset),
                                           run.config.data.cache_dir) if point == "before" else None)
    values = [diagnostics.read_before_cache(cache) if cache is not None and dist.get_rank() == 0 else None]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(values, src=0)
    values = values[0]
    if values is None:
        values = run.heldout.score(run.chunks, run.parallel, run.layout, run.config.train.micro_batch_pairs,
                                   runtime.pad_token_id(run.tokenizer), run.preset.vocab_size,
                                   pad_to_multiple_of=fp8_seq_multiple(model.fp8, model.fp8_recipe),
                                   head=model.logprob_head)
        if cache is not None and dist.get_rank() == 0:
            diagnostics.write_before_cache(cache, values)
    metrics_logger.log(step, {**values, diagnostics.HELDOUT_POINT: point}, console=False)
    if metrics_logger.enabled:
        metrics_logger.console(f"held-out pairs ({point}, step {step}): mean log-prob per token "
                               + ", ".join(f"{key.split('/', 1)[1].replace('_mean_logp', '')} {value:.4f}"
                                           for key, value in values.items() if key.endswith("_mean_logp")))
    return values


def _describe(run: _Run, dp_size: int) -> str:
    config, preset = run.config, run.preset
    reference = ("precomputed" if run.reference_table is not None else "online" if run.reference_scorer is not None
                 else "none")
    resumed = f", resuming from {run.checkpoint} (step {run.start_step})" if run.checkpoint else ""
    return (f"SoLoPO training: {config.objective.name}/{config.objective.mode} on {len(run.dataset)} pairs, model "
            f"{preset.name} ({preset.num_parameters() / 1e6:.1f}M params, {config.model.params_dtype}), "
            f"tp={config.parallel.tp} pp={config.parallel.pp} cp={config.parallel.cp} dp={dp_size}, "
            f"{run.total_steps} steps x {config.train.global_batch_pairs} pairs, layout {run.layout}, "
            f"reference {reference}{resumed}{_describe_diagnostics(run)}")


def _describe_diagnostics(run: _Run) -> str:
    from megatron_solopo.training.diagnostics import grad_share_unsupported

    train, text = run.config.train, ""
    if run.heldout is not None:
        text += f"; {len(run.heldout.samples)} held-out pairs from {run.heldout.source}, not trained on"
    if train.ra_grad_share and run.config.objective.mode == "solo":
        why = grad_share_unsupported(run.optimizer)
        text += (f"; warning: train.ra_grad_share is skipped: {why}" if why else
                 "; RA gradient share measured at logged steps (one extra forward/backward each)")
    return text


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
    started = time.perf_counter()
    resume_from, lock = _preflight(config, parallel)
    try:
        return _train_locked(config, parallel, resume_from, started)
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)


def _train_locked(config: ExperimentConfig, parallel: ParallelContext, resume_from: pathlib.Path | None,
                  started: float) -> RunSummary:
    from megatron_solopo.config import save_config

    rank0 = dist.get_rank() == 0
    output_dir = pathlib.Path(config.train.output_dir)
    run = _setup(config, parallel, resume_from)
    finished_earlier = run.start_step >= run.total_steps
    if rank0 and not finished_earlier:  # only once every input loaded: a refused run leaves the old config
        save_config(config, output_dir / "config.yaml")
    metrics_logger = MetricsLogger(output_dir, enabled=rank0, total_steps=run.total_steps, start_step=run.start_step,
                                   tensorboard=config.train.tensorboard, wandb=config.train.wandb,
                                   wandb_project=config.train.wandb_project, run_config=_plain(config))
    bar = _progress_bar(run, enabled=rank0)
    metrics_logger.console = bar.write
    if rank0:
        bar.write(_describe(run, parallel.dp_size))
    try:
        if finished_earlier:  # nothing to do: its config.yaml and run_summary.json stay as they are
            final_step, reason, last = run.start_step, "already_finished", _earlier_metrics(output_dir)
        else:
            if run.heldout is not None and run.start_step == 0:
                _log_heldout(run, metrics_logger, 0, "before")
            final_step, reason, last = _loop(run, metrics_logger, bar)
            if run.heldout is not None and final_step >= run.total_steps:
                _log_heldout(run, metrics_logger, final_step, "after")
    finally:
        bar.close()
        metrics_logger.close()
    summary = RunSummary(output_dir=str(output_dir), total_steps=run.total_steps, start_step=run.start_step,
                         final_step=final_step, stop_reason=reason, last_metrics=last, checkpoint=run.checkpoint,
                         wall_time_s=time.perf_counter() - started, metrics_path=str(output_dir / METRICS_FILE),
                         diagnostics=_diagnostics_summary(run, output_dir) if rank0 else {},
                         train_pairs=len(run.train_positions))
    if rank0:
        if not finished_earlier:
            record = {**dataclasses.asdict(summary), "finished": summary.finished}
            (output_dir / SUMMARY_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        _record_exit_status(summary)
    return summary


def _diagnostics_summary(run: _Run, output_dir: pathlib.Path) -> dict[str, Any]:
    """run_summary.json's `diagnostics`, from the whole metrics.jsonl (a resumed run's earlier steps too)."""
    from megatron_solopo.training.diagnostics import read_metrics_file, summarize_metrics

    return summarize_metrics(read_metrics_file(output_dir / METRICS_FILE), run.heldout)


def _earlier_metrics(output_dir: pathlib.Path) -> dict[str, Any]:
    """The last metrics a finished run recorded in its run_summary.json (empty when unreadable)."""
    try:
        metrics = json.loads((output_dir / SUMMARY_FILE).read_text(encoding="utf-8")).get("last_metrics")
    except (OSError, ValueError, AttributeError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def _record_exit_status(summary: RunSummary) -> None:
    """Writes summary.exit_code (and what it means) to $SOLOPO_EXIT_STATUS_FILE, if set; rank 0 only, after the
    final checkpoint. Written under a temporary name and renamed, so a reader never sees half a file."""
    path = os.environ.get(EXIT_STATUS_FILE_ENV)
    if not path:
        return
    target = pathlib.Path(path)
    tmp = target.with_name(target.name + ".tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(f"{summary.exit_code}\n{summary.stop_reason} at step {summary.final_step}/{summary.total_steps}"
                       f"; checkpoint {summary.checkpoint}\n", encoding="utf-8")
        os.replace(tmp, target)
    except OSError as err:
        print(f"warning: could not write the exit status file {path}: {err}", file=sys.stderr)


def _plain(config: ExperimentConfig) -> dict[str, Any]:
    from megatron_solopo.config import to_dict

    return to_dict(config)
