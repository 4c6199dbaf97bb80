"""The model's part of a Megatron distributed checkpoint: how it is keyed, and loading it at any layout.

The weights are `sharded_state_dict()` of every (unwrapped) model chunk under "model" (or "model0",
"model1", ... with an interleaved pipeline), with global tensor keys (layers stacked into one tensor
per weight), so any TP/PP layout loads them (dist_checkpointing reshards). Converted and training
checkpoints store the model under the same global keys.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import torch

from megatron_solopo.checkpoint.format import DIST_METADATA_FILE, CheckpointError

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
    store the model under the same global tensor keys. Collective.
    """
    from megatron.core import dist_checkpointing

    path = pathlib.Path(path)
    if not (path / DIST_METADATA_FILE).is_file():
        raise CheckpointError(f"{path} is not a Megatron distributed checkpoint (no {DIST_METADATA_FILE}); give a "
                              "directory written by `solopo convert hf-to-mcore` or a training checkpoint step_N")
    request = model_sharded_state_dict(model_chunks)
    loaded = dist_checkpointing.load(request, str(path))
    for key, chunk in zip(model_state_keys(len(model_chunks)), model_chunks):
        unwrap_model(chunk).load_state_dict(loaded[key])
