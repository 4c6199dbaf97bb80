"""Training checkpoints on Megatron-Core distributed checkpointing (`dist_checkpointing`).

Layout of a run directory::

    output_dir/checkpoints/step_000123/      a complete checkpoint (written as .step_000123.incomplete)
        .metadata, __*_*.distcp, metadata.json   dist_checkpointing's files (model, optimizer, state)
        solopo_checkpoint.json                   kind "trained", step, layout, preset, dtype, time: written last
        config.yaml                              the experiment config that produced it
        hf_assets/                               tokenizer (+ HF config.json), as in a converted checkpoint

The file names and the marker are the checkpoint room's format (checkpoint/format.py); the model's
part is written and read as checkpoint/weights.py describes, so `checkpoint.load_model` loads it.

What one checkpoint holds:

- the model: `sharded_state_dict()` of every (unwrapped) model chunk, keyed "model" (or "model0",
  "model1", ... with an interleaved pipeline), with global tensor keys, so any TP/PP layout can load
  it (dist_checkpointing reshards);
- the optimizer: `optimizer.sharded_state_dict(model_sd, is_loading=...)` (Adam moments, fp32 master
  weights, step), in Megatron's "fully_reshardable" format so it reshards with the model;
- the scheduler, the data sampler position, the step and the parallel layout (common state, rank 0);
- RNG states of every rank (python, numpy, torch CPU, torch CUDA if present, Megatron's model-parallel
  tracker) as one sharded object per rank. They are restored only when the layout is unchanged
  (an RNG state belongs to a rank; with another layout there is no meaningful mapping).

Completion protocol: all ranks save into `.step_N.incomplete`; after dist_checkpointing's final
barrier rank 0 writes `solopo_checkpoint.json`, then `manifest.json` (every file's name and size,
checkpoint/format.py) and renames the directory to `step_N`, then prunes to `keep_last`. Loading
verifies the manifest first; `resolve_resume("auto")` skips a damaged latest checkpoint with a
warning naming it and resumes from the newest intact one. `find_latest_checkpoint` only accepts
`step_N` directories holding the marker, so a run killed mid-save never resumes from a partial
checkpoint. The directory must be on a file system
shared by all ranks (as for any dist_checkpointing save).

Full disk: `check_checkpoint_space` (before the first step, and inside every save) refuses when the free
space is below SPACE_MARGIN x the newest checkpoint's size (or `estimated_checkpoint_bytes` before the
first); a save that fails anyway removes its temporary directory and raises one CheckpointError naming
the checkpoint on every rank (`_save_failed`).
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import logging
import os
import pathlib
import random
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

# the on-disk format (marker, file names) and the model's part of a checkpoint belong to checkpoint/
from megatron_solopo.checkpoint.format import (  # noqa: F401 - CheckpointError, MARKER_FILE: part of this API
    ASSETS_DIR,
    CONFIG_FILE,
    DIST_METADATA_FILE,
    MARKER_FILE,
    TRAINED,
    CheckpointError,
    check_checkpoint,
    read_marker,
    verify_manifest,
    write_manifest,
    write_marker,
)
from megatron_solopo.checkpoint.weights import (
    READ_ERRORS,
    SHARDED_STATE_METADATA,
    error_cause,
    load_module_state,
    load_tolerating_extra_state,
    model_sharded_state_dict,
    model_state_keys,
    unwrap_model,
)
from megatron_solopo.console import describe_error
from megatron_solopo.parallel.parallel_context import current_parallel_context
from megatron_solopo.training.process_guard import die_with_parent

logger = logging.getLogger(__name__)

CHECKPOINTS_SUBDIR = "checkpoints"
FORMAT_VERSION = 1
"""Version of the train_state the checkpoint's common state holds (the marker has its own)."""
_NAME_RE = re.compile(r"^step_(\d+)$")
_INCOMPLETE_SUFFIX = ".incomplete"


# ----------------------------------------------------------------------------------------- names
def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint after `step` optimizer steps: step_000123."""
    return f"step_{step:06d}"


def checkpoints_root(output_dir: str | os.PathLike) -> pathlib.Path:
    """Where a run keeps its checkpoints: output_dir/checkpoints."""
    return pathlib.Path(output_dir) / CHECKPOINTS_SUBDIR


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """True for a `step_N` directory whose save finished (marker and dist_checkpointing metadata present)."""
    path = pathlib.Path(path)
    return (bool(_NAME_RE.match(path.name)) and (path / MARKER_FILE).is_file()
            and (path / DIST_METADATA_FILE).is_file())


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, pathlib.Path]]:
    """Complete checkpoints under `directory` (a run's output_dir or its checkpoints/), oldest first."""
    root = pathlib.Path(directory)
    if (root / CHECKPOINTS_SUBDIR).is_dir():
        root = root / CHECKPOINTS_SUBDIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME_RE.match(child.name)
        if match and child.is_dir() and is_complete_checkpoint(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest_checkpoint(directory: str | os.PathLike) -> pathlib.Path | None:
    """The complete checkpoint with the highest step under `directory`, or None (incomplete ones ignored)."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def read_checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """The (validated) marker of a complete checkpoint: step, layout, format version, time. Errors if incomplete."""
    path = pathlib.Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not is_complete_checkpoint(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER_FILE} or metadata.json, or the "
                              "name is not step_N): it was interrupted while saving; resume from an earlier one")
    return read_marker(path).fields


# ---------------------------------------------------------------------------------- layout, rng
def current_layout(parallel=None) -> dict[str, int]:
    """This job's parallel layout {"tp", "pp", "cp", "dp", "vpp", "world"}: `parallel.layout()` of the
    given ParallelContext, else of the current one (initialize_parallel's)."""
    return (parallel or current_parallel_context()).layout()


def capture_rng_state() -> dict[str, Any]:
    """Every RNG this process draws from: python, numpy, torch CPU/CUDA and Megatron's tracker."""
    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = {name: state.clone() for name, state in get_cuda_rng_tracker().get_states().items()}
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch_cpu": torch.get_rng_state(),
            "torch_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "megatron_tracker": tracker}


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if state["torch_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    get_cuda_rng_tracker().set_states(dict(state["megatron_tracker"]))


def _rng_sharded_object(data: Any):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    # one object per rank: global shape (world,), this rank's slot, each slot written once
    return ShardedObject("rng_state", data, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


# --------------------------------------------------------------------------------- state dicts
def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def uses_distributed_optimizer(optimizer) -> bool:
    """True when (any part of) `optimizer` is Megatron's DistributedOptimizer (ZeRO-1 sharded states)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(opt, DistributedOptimizer) for opt in _sub_optimizers(optimizer))


def _initialize_states_for_loading(optimizer) -> None:
    """Gives a fresh DistributedOptimizer its Adam states before it describes them for loading.

    Without TE/apex (torch Adam) `DistributedOptimizer.state_dict()` reads each parameter's Adam
    "step", which exists only after a first step. Megatron's own dummy step (zero gradients) creates
    the states; loading then overwrites them, and the weights it may touch are loaded afterwards.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in _sub_optimizers(optimizer):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _optimizer_sharded_state_dict(optimizer, model_sd: Mapping[str, Any], is_loading: bool):
    if is_loading:
        _initialize_states_for_loading(optimizer)
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=dict(SHARDED_STATE_METADATA))


def _load_optimizer_state(optimizer, state: Any) -> None:
    """`optimizer.load_state_dict(state)`, working around Megatron 0.19's DistributedOptimizer with torch
    Adam (no TE/apex): its "fully_reshardable" loader copies every tensor state of a parameter, including
    torch Adam's 0-dim "step", which that format does not store (KeyError: 'step'). Here the parameter
    states are loaded by the same Megatron function with "step" set aside; the step itself is restored by
    load_state_dict from the param groups, as Megatron does, then given to each parameter as its own tensor."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = _sub_optimizers(optimizer)
    if len(subs) == 1:
        states = [state]
    elif isinstance(state, Mapping):
        states = [value for _, value in sorted(state.items())]
    else:
        states = list(state)
    deferred = []
    for opt, sub_state in zip(subs, states):
        if (isinstance(opt, DistributedOptimizer) and isinstance(sub_state, dict)
                and sub_state.get("param_state_sharding_type") == "fully_reshardable" and "param_state" in sub_state):
            deferred.append((opt, sub_state.pop("param_state")))
    optimizer.load_state_dict(state)
    for opt, param_state in deferred:
        steps = {param: values.pop("step") for param, values in opt.optimizer.state.items()
                 if isinstance(values.get("step"), torch.Tensor)}
        try:
            opt.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            # Megatron's load_state_dict gave every parameter the SAME step tensor; torch Adam increments
            # each parameter's step in place, so a shared one would advance once per parameter per step
            for param, step in steps.items():
                opt.optimizer.state[param]["step"] = step.detach().clone()


_SCHEDULE_GROUP_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")
"""Per-group values Megatron uses to match saved and current param groups that are hyperparameters of
the schedule, not the group's identity: they may change on resume."""


_ADOPTED_GROUP_KEYS = (*_SCHEDULE_GROUP_KEYS, "lr", "weight_decay", "betas", "eps")
"""Hyperparameters a resumed optimizer takes from this run; everything else of a saved group (the Adam
"step" Megatron stores there for the distributed optimizer, ...) is the checkpoint's."""


def _group_identity(group: Mapping[str, Any]) -> tuple:
    """The structural part of Megatron's param-group identifier (wd_mult, lr_mult, expert/decoupled flags)."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    return tuple(group.get(key, group.get(f"pre_{key}")) for key in param_group_identifier_keys
                 if key not in _SCHEDULE_GROUP_KEYS)


def _saved_group_dicts(state: Any):
    """Every saved param group (or DistributedOptimizer per-parameter group metadata) inside `state`."""
    if isinstance(state, Mapping):
        for key, value in state.items():
            if key == "param_groups" and isinstance(value, list):
                yield from (group for group in value if isinstance(group, dict))
            elif key == "param_to_group_meta" and isinstance(value, Mapping):
                yield from (meta for meta in value.values() if isinstance(meta, dict))
            else:
                yield from _saved_group_dicts(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _saved_group_dicts(value)


def adopt_current_hyperparameters(optimizer, loaded_state: Any) -> dict[str, tuple[Any, Any]]:
    """Makes a loaded optimizer state carry this run's hyperparameters (lr, min_lr, weight decay, betas,
    eps, ...) instead of the saved ones, in place; returns {key: (saved, current)} for those that differ.

    Megatron matches saved and current param groups by a key that includes max_lr/min_lr/start_wd/end_wd,
    so a resume with another lr fails ("Could not find parameter group with key ..."). Groups are matched
    here by their structural identity only; the Adam moments and step count are kept.
    """
    current = [group for opt in _sub_optimizers(optimizer) for group in opt.optimizer.param_groups]
    by_identity: dict[tuple, list[dict]] = {}
    for group in current:
        by_identity.setdefault(_group_identity(group), []).append(group)
    changed: dict[str, tuple[Any, Any]] = {}
    for saved in _saved_group_dicts(loaded_state):
        candidates = by_identity.get(_group_identity(saved))
        if not candidates:
            continue  # a structurally different group: Megatron's own check reports it
        for key in _ADOPTED_GROUP_KEYS:
            if key not in candidates[0]:
                continue
            value = candidates[0][key]
            if key in saved and saved[key] != value and key != "lr":  # lr is the schedule's, set on load
                changed.setdefault(key, (saved[key], value))
            saved[key] = value
    return changed


# ----------------------------------------------------------------------------- the writer's helper
def _checkpoint_writer_dies_with_this_process() -> None:
    """Makes the helper process dist_checkpointing's torch_dist writer starts (a multiprocessing Manager
    holding its results queue, ~0.5 GiB, spawned once per process) end when this process ends, even by
    SIGKILL: Megatron creates it lazily in `filesystem_async.get_write_results_queue`; here the same kind
    of queue is created first, from a Manager whose process asks Linux for SIGTERM when its parent dies.
    A normal exit (including SIGTERM through the loop's handler) shuts it down via multiprocessing's atexit."""
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async


    if getattr(filesystem_async, "_results_queue", None) is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=die_with_parent)
    filesystem_async._results_queue = manager.Queue()


# -------------------------------------------------------------------------------------- saving
@dataclasses.dataclass
class TrainState:
    """What a checkpoint restores besides weights and optimizer moments."""

    step: int
    """Optimizer steps completed."""
    sampler: dict[str, Any]
    """`DistributedPairSampler.state_dict()` at the end of that step (epoch, position, seed, ...)."""
    scheduler: dict[str, Any] | None = None
    """`OptimizerParamScheduler.state_dict()`."""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Anything else the trainer wants back (plain python values, identical on every rank)."""


def save_checkpoint(output_dir: str | os.PathLike, state: TrainState, model_chunks: Sequence[torch.nn.Module],
                    optimizer=None, scheduler=None, keep_last: int = 0, config_yaml: str | None = None,
                    tokenizer: Any = None, hf_config: Mapping[str, Any] | None = None,
                    metadata: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Saves a complete checkpoint `output_dir/checkpoints/step_N` (collective: call on every rank).

    Writes under a temporary name, renames when every rank has finished, then deletes all but the
    newest `keep_last` complete checkpoints (0 keeps all). `scheduler` (if given) overrides
    `state.scheduler`. `tokenizer` and `hf_config` (the model's HF config.json, when it came from
    one) go to hf_assets/ as in a converted checkpoint (checkpoint/format.py), and `metadata`
    (preset, dtype, source) into the marker (kind "trained"), so a training checkpoint also serves as
    `model.checkpoint` for evaluation, conversion back to HF, or another run. Returns the directory.
    """
    root = checkpoints_root(output_dir)
    final = root / checkpoint_name(state.step)
    tmp = root / f".{final.name}{_INCOMPLETE_SUFFIX}"
    rank = dist.get_rank()
    check_checkpoint_space(output_dir, model_chunks, optimizer)  # collective
    _on_rank0_then_everywhere(lambda: _fresh_directory(root, tmp), final)

    from megatron.core import dist_checkpointing

    model_sd = model_sharded_state_dict(model_chunks)
    sharded_sd: dict[str, Any] = dict(model_sd)
    if optimizer is not None:
        sharded_sd["optimizer"] = _optimizer_sharded_state_dict(optimizer, model_sd, is_loading=False)
    sharded_sd["rng_state"] = _rng_sharded_object(capture_rng_state())
    sharded_sd["train_state"] = {
        "step": state.step, "sampler": dict(state.sampler),
        "scheduler": scheduler.state_dict() if scheduler is not None else state.scheduler,
        "extra": dict(state.extra), "layout": current_layout(), "format_version": FORMAT_VERSION,
        "num_model_chunks": len(model_chunks),
        "distributed_optimizer": None if optimizer is None else uses_distributed_optimizer(optimizer),
    }
    _checkpoint_writer_dies_with_this_process()
    try:
        dist_checkpointing.save(sharded_sd, str(tmp))  # collective; ends with a barrier
    except READ_ERRORS as err:  # a full disk surfaces as CheckpointException / "Worker failure"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_failed(final, err) from None

    def finish() -> None:
        _write_side_files(tmp, state.step, config_yaml, tokenizer, hf_config, metadata)
        _publish(tmp, final)
        if keep_last:
            prune_checkpoints(root, keep_last)

    _on_rank0_then_everywhere(finish, final, cleanup=tmp)
    return final


def _fresh_directory(root: pathlib.Path, tmp: pathlib.Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a save that was killed
    tmp.mkdir()


def _on_rank0_then_everywhere(work, final: pathlib.Path, cleanup: pathlib.Path | None = None) -> None:
    """Runs `work` on rank 0; a failure (a full disk, ...) raises the same CheckpointError on every rank instead
    of leaving the others waiting in the next barrier. `cleanup` (the temporary directory) is removed then."""
    error = None
    if dist.get_rank() == 0:
        try:
            work()
        except (OSError, CheckpointError) as err:
            if cleanup is not None:
                shutil.rmtree(cleanup, ignore_errors=True)
            error = str(_save_failed(final, err)) if isinstance(err, OSError) else str(err)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise CheckpointError(error)


def _disk_full(err: BaseException) -> bool:
    """Whether `err` (or the exception a rank of a CheckpointException raised, or its cause) is ENOSPC/EDQUOT."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(err, CheckpointException) and err.failures:
            failure = next(iter(err.failures.values()))
            if _disk_full(failure[0] if isinstance(failure, tuple) else failure):
                return True
        if "No space left on device" in str(err) or "Errno 28" in str(err):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _save_failed(final: pathlib.Path, err: BaseException) -> CheckpointError:
    """The one-line error of a checkpoint that could not be written: the directory, the cause, the fix."""
    cause = describe_error(err) if isinstance(err, OSError) else error_cause(err)
    latest = find_latest_checkpoint(final.parent)
    # Megatron's writer workers report "Worker failure" without the OSError: look at the disk itself
    little_space = _free_bytes(final.parent) < max(directory_size(latest) if latest else 0, 2**20)
    fix = ("the disk is full: free space there (or choose another train.output_dir) and resume with train.resume="
           "auto" if _disk_full(err) or little_space else
           "check that the directory is writable and resume with train.resume=auto")
    kept = (f"the newest complete checkpoint, {latest}, is untouched" if latest is not None and latest != final
            else "no earlier checkpoint of this run exists")
    return CheckpointError(f"checkpoint {final} could not be written ({cause}); {fix} ({kept})")


# ------------------------------------------------------------------------------------ free space
SPACE_MARGIN = 1.1
"""A save needs this many times the size of the last checkpoint (or of the estimate) in free space."""


def _free_bytes(path: pathlib.Path) -> int:
    """Free bytes of the disk that holds `path` (or, before it exists, its nearest existing parent)."""
    existing = next((p for p in (path, *path.parents) if p.is_dir()), pathlib.Path("/"))
    return shutil.disk_usage(existing).free


def directory_size(path: str | os.PathLike) -> int:
    """Bytes of every file under `path`."""
    return sum(file.stat().st_size for file in pathlib.Path(path).rglob("*") if file.is_file())


def estimated_checkpoint_bytes(model_chunks: Sequence[torch.nn.Module], optimizer=None) -> int:
    """About how large a checkpoint of this model is when none was saved yet: every weight (this rank's shard
    times tp x pp), plus fp32 master weights and two Adam moments per weight with an optimizer."""
    local = sum(p.numel() * (p.element_size() + (12 if optimizer is not None else 0))
                for chunk in model_chunks for p in chunk.parameters())
    layout = current_layout()
    return int(local * layout["tp"] * layout["pp"])


def check_checkpoint_space(output_dir: str | os.PathLike, model_chunks: Sequence[torch.nn.Module],
                           optimizer=None) -> None:
    """CheckpointError on every rank, before anything is written, when the disk of `output_dir` has less free
    space than the next checkpoint needs: SPACE_MARGIN x the size of the newest complete checkpoint there, else
    of `estimated_checkpoint_bytes`. Collective (rank 0 measures)."""
    estimate = estimated_checkpoint_bytes(model_chunks, optimizer)  # on every rank: no collective inside

    def check() -> None:
        root = checkpoints_root(output_dir)
        latest = find_latest_checkpoint(output_dir)
        needed = int(SPACE_MARGIN * (directory_size(latest) if latest is not None else estimate))
        where = root if root.is_dir() else pathlib.Path(output_dir)
        free = _free_bytes(where)
        if free < needed:
            basis = f"the size of {latest.name}" if latest is not None else "an estimate from the model's size"
            raise CheckpointError(
                f"not enough free space for the next checkpoint in {where}: {free / 2**20:.1f} MiB free, about "
                f"{needed / 2**20:.1f} MiB needed ({basis}, x{SPACE_MARGIN}); free space there or choose another "
                "train.output_dir (train.keep_last limits how many checkpoints are kept)")

    _on_rank0_then_everywhere(check, checkpoints_root(output_dir))


def _write_side_files(directory: pathlib.Path, step: int, config_yaml: str | None, tokenizer: Any,
                      hf_config: Mapping[str, Any] | None, metadata: Mapping[str, Any] | None) -> None:
    if config_yaml is not None:
        (directory / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
    assets = directory / ASSETS_DIR
    if tokenizer is not None:
        tokenizer.save_pretrained(str(assets))
    if hf_config is not None:
        assets.mkdir(exist_ok=True)
        (assets / "config.json").write_text(json.dumps(dict(hf_config), indent=2) + "\n", encoding="utf-8")
    fields = {"step": step, "layout": current_layout(), **dict(metadata or {}),
              "hf_assets_dir": ASSETS_DIR if assets.is_dir() else None,
              "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    # the marker is what makes a checkpoint count as complete: written atomically; then the manifest of
    # every file's size (what loading verifies), then the directory is renamed (published)
    write_marker(directory, TRAINED, fields)
    write_manifest(directory)


def _publish(tmp: pathlib.Path, final: pathlib.Path) -> None:
    """Renames the finished temporary directory to its final name (replacing a same-step checkpoint)."""
    old = final.with_name(f".{final.name}.replaced")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def prune_checkpoints(directory: str | os.PathLike, keep_last: int) -> list[pathlib.Path]:
    """Deletes all but the newest `keep_last` complete checkpoints; returns the deleted directories."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 to prune (0 means keep all), got {keep_last}")
    found = list_checkpoints(directory)
    doomed = [path for _, path in found[:-keep_last]]
    for path in doomed:
        # rename first so a half-deleted directory never looks like a complete checkpoint
        trash = path.with_name(f".{path.name}.deleting")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


# ------------------------------------------------------------------------------------- loading
def load_common_state(path: str | os.PathLike) -> dict[str, Any]:
    """The non-tensor part of a checkpoint (train_state: step, sampler, scheduler, layout)."""
    from megatron.core import dist_checkpointing

    read_checkpoint_info(path)
    return dist_checkpointing.load_common_state_dict(str(path))




def load_checkpoint(path: str | os.PathLike, model_chunks: Sequence[torch.nn.Module], optimizer=None,
                    scheduler=None, load_rng: bool = True) -> TrainState:
    """Restores model chunks, optimizer, scheduler and (same layout only) RNG from `path` (collective).

    Works with another TP/PP/DP layout than the one that saved: tensors are resharded. Returns the
    TrainState (step, sampler position, scheduler state, extra). Without `optimizer` only weights load.
    """
    path = pathlib.Path(path)
    check_checkpoint(path, "resume from an earlier one (train.resume=<its directory>) or delete this one")
    try:
        common = load_common_state(path)
    except CheckpointError:
        raise
    except READ_ERRORS as err:  # torch.distributed.checkpoint raises anything on damaged files
        raise CheckpointError(f"checkpoint {path} cannot be read ({error_cause(err)}); it is damaged: "
                              "resume from an earlier one or delete it") from err
    train_state = common["train_state"]
    if train_state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {train_state.get('format_version')} is not the "
                              f"supported format {FORMAT_VERSION}")
    saved_distributed = train_state.get("distributed_optimizer")
    if optimizer is not None and saved_distributed is not None and saved_distributed != uses_distributed_optimizer(
            optimizer):
        raise CheckpointError(f"{path} was saved with train.distributed_optimizer={str(saved_distributed).lower()}; "
                              "resume with the same setting (the optimizer states are stored differently)")
    same_layout = train_state["layout"] == current_layout()
    model_sd = model_sharded_state_dict(model_chunks)
    request: dict[str, Any] = dict(model_sd)
    if optimizer is not None:
        request["optimizer"] = _optimizer_sharded_state_dict(optimizer, model_sd, is_loading=True)
    restore_rng = load_rng and same_layout
    if restore_rng:
        request["rng_state"] = _rng_sharded_object(None)
    elif load_rng and dist.get_rank() == 0:
        logger.info("checkpoint %s was saved with layout %s, this run is %s: weights and optimizer are resharded, "
                    "RNG states start fresh", path, train_state["layout"], current_layout())
    try:
        loaded = load_tolerating_extra_state(request, path)  # a checkpoint written without TE loads with TE
    except READ_ERRORS as err:  # a damaged file surfaces as any exception inside the reader
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({error_cause(err)}); it is damaged "
                              "or does not fit this model: resume from an earlier one") from err

    for key, chunk in zip(model_state_keys(len(model_chunks)), model_chunks):
        load_module_state(unwrap_model(chunk), loaded[key], where=str(path))  # only _extra_state may be missing
    if optimizer is not None:
        changed = adopt_current_hyperparameters(optimizer, loaded["optimizer"])
        if changed and dist.get_rank() == 0:
            logger.info("optimizer hyperparameters differ from %s's, using this run's: %s", path,
                        ", ".join(f"{key} {old} -> {new}" for key, (old, new) in sorted(changed.items())))
        _load_optimizer_state(optimizer, loaded["optimizer"])
    if scheduler is not None and train_state["scheduler"] is not None:
        scheduler.load_state_dict(train_state["scheduler"])  # step count only: see optim.build_scheduler
    if restore_rng:
        restore_rng_state(loaded["rng_state"])
    return TrainState(step=train_state["step"], sampler=train_state["sampler"], scheduler=train_state["scheduler"],
                      extra=train_state.get("extra", {}))


def latest_intact_checkpoint(output_dir: str | os.PathLike) -> pathlib.Path | None:
    """The newest complete checkpoint whose files match its manifest. Damaged newer ones are skipped with a
    warning naming them; CheckpointError naming them when every checkpoint is damaged; None when there is none."""
    found = list_checkpoints(output_dir)
    damaged = []
    for _, path in reversed(found):
        problems = verify_manifest(path)
        if not problems:
            for bad, why in damaged:
                message = (f"warning: checkpoint {bad} is damaged ({why}); resuming from the previous complete "
                           f"one, {path}")
                logger.warning(message)
                if not dist.is_initialized() or dist.get_rank() == 0:
                    print(message, file=sys.stderr)
            return path
        damaged.append((path, "; ".join(problems)))
    if damaged:
        raise CheckpointError("every checkpoint in " + str(checkpoints_root(output_dir)) + " is damaged: "
                              + " | ".join(f"{bad}: {why}" for bad, why in damaged)
                              + "; delete them (or use another train.output_dir) to start again")
    return None


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> pathlib.Path | None:
    """The checkpoint to resume from for train.resume = none | auto | force | a directory (None = start fresh).

    none refuses an output_dir that already holds checkpoints (it would mix two runs); auto picks the
    latest complete one; a path must be a complete checkpoint (or a run directory holding one).
    """
    if resume == "none":
        existing = find_latest_checkpoint(output_dir)
        if existing is not None:
            raise CheckpointError(f"train.resume=none but {output_dir} already holds checkpoint {existing.name}; "
                                  "use train.resume=auto to continue it, or another train.output_dir")
        return None
    if resume in ("auto", "force"):
        return latest_intact_checkpoint(output_dir)
    path = pathlib.Path(resume)
    if is_complete_checkpoint(path):
        problems = verify_manifest(path)
        if problems:
            earlier = [p for _, p in list_checkpoints(path.parent) if p.name < path.name and not verify_manifest(p)]
            hint = f"the newest intact earlier one is {earlier[-1]}" if earlier else "no intact earlier one exists"
            raise CheckpointError(f"train.resume={resume}: checkpoint {path} is damaged ({'; '.join(problems)}); "
                                  f"{hint}")
        return path
    latest = latest_intact_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise CheckpointError(f"train.resume={resume!r} is neither a complete checkpoint (step_N with {MARKER_FILE}) "
                              "nor a directory holding one; give an existing checkpoint, auto or none")
    return latest
