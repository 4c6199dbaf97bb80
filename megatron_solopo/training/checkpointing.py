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
barrier rank 0 writes `solopo_checkpoint.json` and renames the directory to `step_N`, then prunes
to `keep_last`. `find_latest_checkpoint` only accepts `step_N` directories holding that file, so a
run killed mid-save never resumes from a partial checkpoint. The directory must be on a file system
shared by all ranks (as for any dist_checkpointing save).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import pathlib
import random
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

# the on-disk format (marker, file names) and the model's part of a checkpoint belong to checkpoint/
from megatron_solopo.checkpoint.format import (  # noqa: F401 - CheckpointError, MARKER_FILE: part of this API
    ASSETS_DIR,
    CONFIG_FILE,
    DIST_METADATA_FILE,
    MARKER_FILE,
    TRAINED,
    CheckpointError,
    read_marker,
    write_marker,
)
from megatron_solopo.checkpoint.weights import (  # noqa: F401 - load_model_weights: part of this API
    SHARDED_STATE_METADATA,
    load_model_weights,
    model_sharded_state_dict,
    model_state_keys,
    unwrap_model,
)

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
    from megatron_solopo.parallel.context import current_parallel_context

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


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a save that was killed
        tmp.mkdir()
    _barrier()

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
    dist_checkpointing.save(sharded_sd, str(tmp))  # collective; ends with a barrier

    if rank == 0:
        _write_side_files(tmp, state.step, config_yaml, tokenizer, hf_config, metadata)
        _publish(tmp, final)
        if keep_last:
            prune_checkpoints(root, keep_last)
    _barrier()
    return final


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
    # the marker is what makes a checkpoint count as complete: written atomically, last
    write_marker(directory, TRAINED, fields)


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
    from megatron.core import dist_checkpointing

    path = pathlib.Path(path)
    common = load_common_state(path)
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
    loaded = dist_checkpointing.load(request, str(path))

    for key, chunk in zip(model_state_keys(len(model_chunks)), model_chunks):
        unwrap_model(chunk).load_state_dict(loaded[key])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and train_state["scheduler"] is not None:
        scheduler.load_state_dict(train_state["scheduler"])
    if restore_rng:
        restore_rng_state(loaded["rng_state"])
    return TrainState(step=train_state["step"], sampler=train_state["sampler"], scheduler=train_state["scheduler"],
                      extra=train_state.get("extra", {}))


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> pathlib.Path | None:
    """The checkpoint to resume from for train.resume = none | auto | a directory (None = start fresh).

    none refuses an output_dir that already holds checkpoints (it would mix two runs); auto picks the
    latest complete one; a path must be a complete checkpoint (or a run directory holding one).
    """
    if resume == "none":
        existing = find_latest_checkpoint(output_dir)
        if existing is not None:
            raise CheckpointError(f"train.resume=none but {output_dir} already holds checkpoint {existing.name}; "
                                  "use train.resume=auto to continue it, or another train.output_dir")
        return None
    if resume == "auto":
        return find_latest_checkpoint(output_dir)
    path = pathlib.Path(resume)
    if is_complete_checkpoint(path):
        return path
    latest = find_latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise CheckpointError(f"train.resume={resume!r} is neither a complete checkpoint (step_N with {MARKER_FILE}) "
                              "nor a directory holding one; give an existing checkpoint, auto or none")
    return latest
