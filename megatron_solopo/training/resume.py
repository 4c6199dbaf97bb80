"""Which checkpoint a run continues, decided before anything is written: `preflight`.

Rank 0 takes the run lock (training/run_lock.py), resolves train.resume to a checkpoint and compares
that checkpoint's config with this run's: another objective, data, model or global batch is refused
unless train.resume=force; schedule settings may change (printed). A run shorter than the
checkpoint it continues is refused too (it would report "finished" without training).
"""

from __future__ import annotations

import contextlib
import pathlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from megatron_solopo.checkpoint.format import CONFIG_FILE
from megatron_solopo.dataclass_yaml import to_dict
from megatron_solopo.parallel.parallel_context import ParallelContext
from megatron_solopo.training.config import TrainConfig
from megatron_solopo.training.run_lock import acquire_run_lock
from megatron_solopo.training.run_state import CheckpointError, read_checkpoint_info, resolve_resume

if TYPE_CHECKING:
    from megatron_solopo.config import ExperimentConfig

__all__ = ["check_not_past_the_end", "compare_with_checkpoint_config", "preflight"]

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


# ------------------------------------------------------------------------------------------ config comparison
def _differences(saved: dict, current: dict, keys: list[str]) -> list[tuple[str, Any, Any]]:
    out = []
    for dotted in keys:
        section, key = dotted.split(".", 1)
        old, new = saved.get(section, {}).get(key), current.get(section, {}).get(key)
        if old != new:
            out.append((dotted, old, new))
    return out


def _with_new_train_defaults(saved: dict) -> dict:
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


    file = path / CONFIG_FILE
    if not file.is_file():
        return None
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
        raise CheckpointError(f"{file} cannot be read ({err}); the checkpoint {path} is damaged") from None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------------------------------------------ checks
def check_not_past_the_end(train: TrainConfig, resume_from: pathlib.Path, total_steps: int) -> None:
    """A run shorter than the checkpoint it continues would report "finished" without training: refused."""
    step = read_checkpoint_info(resume_from).get("step")
    if isinstance(step, int) and step > total_steps:
        setting = f"train.steps={train.steps}" if train.steps is not None else f"train.epochs={train.epochs}"
        raise CheckpointError(f"{setting} gives {total_steps} steps, but {resume_from} is already at step {step}; "
                              f"to continue that run give more than {step} steps, or use a new train.output_dir")


def _check_resume_config(config: ExperimentConfig, resume_from: pathlib.Path) -> None:
    """Refuses to continue a checkpoint trained with another objective/data/model/global batch unless
    train.resume=force; prints what changed in the schedule (allowed)."""
    if config.train.steps is not None:  # before anything is printed about the schedule (epochs: once data loaded)
        check_not_past_the_end(config.train, resume_from, config.train.steps)
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


# ------------------------------------------------------------------------------------------ preflight
def _decide_on_rank0(config: ExperimentConfig, parallel: ParallelContext) -> tuple[list[Any], pathlib.Path | None]:
    """([checkpoint to resume from or None, error "Kind\\0message" or None], the lock this process holds)."""
    train, lock = config.train, None
    try:
        train.num_microbatches(parallel.dp_size)  # fail before any loading when the batch does not split
        output_dir = pathlib.Path(train.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        lock = acquire_run_lock(output_dir)
        resume_from = resolve_resume(train.resume, train.output_dir)
        if resume_from is not None:
            _check_resume_config(config, resume_from)
        return [None if resume_from is None else str(resume_from), None], lock
    except (CheckpointError, ValueError, OSError) as err:
        if lock is not None:
            lock.unlink(missing_ok=True)
        return [None, f"{type(err).__name__}\0{err}"], None


@contextlib.contextmanager
def preflight(config: ExperimentConfig, parallel: ParallelContext) -> Iterator[pathlib.Path | None]:
    """Yields the checkpoint to resume from (None: a fresh run), decided on rank 0 and shared by all ranks,
    while rank 0 holds the run lock (removed on exit). Collective.

    Nothing in output_dir is written or deleted before these checks pass (except the lock); a refusal is
    raised on every rank (CheckpointError, or ValueError for a batch that does not split).
    """
    decision: list[Any] = [None, None]
    lock = None
    if dist.get_rank() == 0:
        decision, lock = _decide_on_rank0(config, parallel)
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(decision, src=0)
    if decision[1] is not None:
        kind, message = decision[1].split("\0", 1)
        raise (ValueError if kind == "ValueError" else CheckpointError)(message)
    try:
        yield None if decision[0] is None else pathlib.Path(decision[0])
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)
