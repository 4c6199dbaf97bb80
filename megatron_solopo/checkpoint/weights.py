"""The model's part of a Megatron distributed checkpoint: how it is keyed, and loading it at any layout.

The weights are `sharded_state_dict()` of every (unwrapped) model chunk under "model" (or "model0",
"model1", ... with an interleaved pipeline), with global tensor keys (layers stacked into one tensor
per weight), so any TP/PP layout loads them (dist_checkpointing reshards). Converted and training
checkpoints store the model under the same global keys.
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import torch

from torch.distributed.checkpoint.api import CheckpointException

from megatron_solopo.checkpoint.format import DIST_METADATA_FILE, CheckpointError, check_checkpoint

READ_ERRORS = (Exception, CheckpointException)
"""What reading a damaged checkpoint can raise: anything (torch.distributed.checkpoint's CheckpointException
derives from BaseException, not Exception)."""


def error_cause(err: BaseException) -> str:
    """One line for an error of torch.distributed.checkpoint: the first rank's own exception ("UnpicklingError:
    invalid load key") instead of CheckpointException's text, which holds every rank's whole traceback."""
    if isinstance(err, CheckpointException) and err.failures:
        rank, failure = next(iter(err.failures.items()))
        cause = failure[0] if isinstance(failure, tuple) and failure else failure
        return f"{error_cause(cause)} on rank {rank}" if isinstance(cause, BaseException) else str(cause)
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:300]}"

# Same metadata on save and load: optimizer state in a layout-independent ("fully reshardable") form,
# no prefix per chained sub-optimizer, layers stacked into one tensor per weight.
SHARDED_STATE_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
    "singleton_local_shards": False,
}


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers (their state dicts add a 'module.' prefix)."""
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk


def model_state_keys(num_chunks: int) -> list[str]:
    """The top-level keys of the model chunks: ["model"], or ["model0", "model1", ...] per virtual stage."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def model_sharded_state_dict(model_chunks: Sequence[torch.nn.Module]) -> dict[str, Any]:
    """{"model": sd} (or "model0", "model1", ... per virtual stage) with global, layout-free tensor keys."""
    return {key: unwrap_model(chunk).sharded_state_dict(metadata=dict(SHARDED_STATE_METADATA))
            for key, chunk in zip(model_state_keys(len(model_chunks)), model_chunks)}


def load_model_weights(path: str | os.PathLike, model_chunks: Sequence[torch.nn.Module]) -> None:
    """Loads only the weights of a Megatron distributed checkpoint into `model_chunks`, at any layout.

    Accepts a training checkpoint (step_N) or a converted one (`solopo convert hf-to-mcore`): both
    store the model under the same global tensor keys, and may have been written without Transformer
    Engine while this model has TE modules (`load_tolerating_extra_state`). Collective.
    """
    path = pathlib.Path(path)
    check_checkpoint(path)  # its manifest: a truncated or missing file is named before torch reads it
    if not (path / DIST_METADATA_FILE).is_file():
        raise CheckpointError(f"{path} is not a Megatron distributed checkpoint (no {DIST_METADATA_FILE}); give a "
                              "directory written by `solopo convert hf-to-mcore` or a training checkpoint step_N")
    request = model_sharded_state_dict(model_chunks)
    try:
        loaded = load_tolerating_extra_state(request, path)
    except CheckpointError:
        raise
    except READ_ERRORS as err:  # torch.distributed.checkpoint raises anything (EOFError, UnpicklingError) on bad files
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({error_cause(err)}); it is damaged or "
                              "is not a checkpoint of this model: use an intact checkpoint or re-create it") from err
    for key, chunk in zip(model_state_keys(len(model_chunks)), model_chunks):
        load_module_state(unwrap_model(chunk), loaded[key], where=str(path))


EXTRA_STATE_SUFFIX = "_extra_state"


def _drop_entries(tree: Any, keep) -> list[str]:
    """Removes, in place, every sharded entry of a nested dict/list for which keep(entry) is False."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    dropped: list[str] = []
    items = list(tree.items()) if isinstance(tree, dict) else list(enumerate(tree))
    for name, value in reversed(items):  # reversed: list indices stay valid while deleting
        if isinstance(value, (dict, list)):
            dropped += _drop_entries(value, keep)
        elif isinstance(value, ShardedBase) and not keep(value):
            dropped.append(value.key)
            del tree[name]
    return dropped


def load_tolerating_extra_state(request: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """dist_checkpointing.load of `request`, tolerating ONLY `_extra_state` entries the checkpoint lacks.

    Transformer Engine modules carry `_extra_state` (FP8 metadata); when TE imports, Megatron builds even
    the final norm as TE's for every spec. A checkpoint written without TE (every CPU training run and
    `convert hf-to-mcore`) has none of them: those requests are dropped (TE re-initializes them, as for a
    fresh model). Every other missing tensor still fails in dist_checkpointing, naming the key. The
    opposite direction (a TE checkpoint loaded without TE) has unexpected `_extra_state` entries, which
    dist_checkpointing ignores. Collective.
    """
    from megatron.core import dist_checkpointing

    stored = _stored_keys(path)
    dropped = _drop_entries(request, lambda sh: not sh.key.endswith(EXTRA_STATE_SUFFIX) or sh.key in stored)
    if dropped:
        logging.getLogger(__name__).info("%s has no TE extra state for %s (written without Transformer "
                                         "Engine); those modules keep their fresh state", path, sorted(set(dropped)))
    return dist_checkpointing.load(request, str(path))


def _stored_keys(path: str | os.PathLike) -> set[str]:
    """Keys of every sharded entry (tensors and objects: `_extra_state` is an object) of a checkpoint."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    return {sh.key for sh in load_sharded_metadata(str(path)).values()}


def load_module_state(module: torch.nn.Module, state: dict[str, Any], where: str = "checkpoint") -> None:
    """module.load_state_dict(state) that accepts missing `_extra_state` keys only (asserted)."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(EXTRA_STATE_SUFFIX)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{where}: the model's weights do not match the checkpoint: missing {missing}, "
                              f"unexpected {list(result.unexpected_keys)} (only TE's _extra_state may be missing)")
