"""The one model loader: this rank's GPTModel chunks with their weights, from any source.

A `ModelConfig` names exactly one source: `hf_model` (a Hugging Face directory, converted on load),
`checkpoint` (a Megatron distributed checkpoint: converted by `solopo convert hf-to-mcore`, or a
training checkpoint step_N; saved with any layout) or neither (random initialization of `preset`,
seeded by `init_seed`, identical for every TP layout). Its `params_dtype` and `attention_backend`
say how the model computes. Training, conversion, evaluation and the benchmark all load through
`load_model`; the architecture and the tokenizer are resolved here too (`resolve_preset`,
`resolve_tokenizer_dir`), the same way for every command.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import TYPE_CHECKING, Any

import torch

from megatron_solopo.checkpoint.format import (
    ASSETS_DIR,
    CONFIG_FILE,
    HF_CONFIG_FILE,
    MARKER_FILE,
    TRAINED,
    CheckpointMarker,
    MarkerError,
    find_marker,
    read_marker,
    stored_tokenizer_dir,
)
from megatron_solopo.checkpoint.weights import load_model_weights
from megatron_solopo.model.builder import build_model_chunks
from megatron_solopo.model.config import ModelConfig
from megatron_solopo.model.hf import HFCheckpointReader, check_hf_names, infer_preset_from_hf, load_hf_weights
from megatron_solopo.model.presets import ModelPreset, get_preset
from megatron_solopo.parallel.config import ParallelConfig

if TYPE_CHECKING:
    from megatron_solopo.parallel.parallel_context import ParallelContext

logger = logging.getLogger(__name__)

_DEFAULT_PRESET = ModelConfig().preset


# ------------------------------------------------------------------------------------ architecture
def _same_architecture(a: ModelPreset, b: ModelPreset) -> bool:
    return dataclasses.replace(a, name="") == dataclasses.replace(b, name="")


def _check_named_preset(model: ModelConfig, found: ModelPreset, source: str) -> ModelPreset:
    """A preset named in the config next to a checkpoint must describe the same architecture."""
    if model.preset == _DEFAULT_PRESET:
        return found
    named = get_preset(model.preset)
    if not _same_architecture(named, found):
        raise ValueError(f"model.preset={model.preset!r} does not match the architecture of {source} ({found}); "
                         f"remove model.preset (it is read from {source}) or point to the right model")
    return named


_SOURCE_FIELDS = ("preset", "hf_model", "checkpoint", "tokenizer", "params_dtype", "init_seed")


def saved_model_config(path: str | os.PathLike) -> ModelConfig | None:
    """Where the model of a training checkpoint came from: the source fields (preset, hf_model,
    checkpoint, tokenizer, params_dtype, init_seed) of the `model` section saved with it in
    config.yaml (None without one)."""
    import yaml

    file = pathlib.Path(path) / CONFIG_FILE
    if not file.is_file():
        return None
    section = (yaml.safe_load(file.read_text(encoding="utf-8")) or {}).get("model") or {}
    return ModelConfig(**{k: section[k] for k in _SOURCE_FIELDS if k in section})


def _recorded_preset(marker: CheckpointMarker) -> ModelPreset | None:
    """The architecture a marker records, or (a training checkpoint whose marker has none) the one the run
    resolved from the config saved with it; None when neither says."""
    if marker.preset is not None:
        try:
            return ModelPreset(**marker.preset)
        except TypeError as err:
            raise MarkerError(f"{marker.path / MARKER_FILE}: its preset is not a valid architecture ({err})") from err
    saved = saved_model_config(marker.path) if marker.kind == TRAINED else None
    if saved is None:
        return None
    if saved.hf_model and not (pathlib.Path(saved.hf_model) / HF_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"training checkpoint {marker.path} started from model.hf_model={saved.hf_model}, "
                                "which is not reachable from here; run from the directory the training ran in (the "
                                f"architecture is read from that {HF_CONFIG_FILE})")
    return resolve_preset(saved)


def checkpoint_preset(path: str | os.PathLike) -> ModelPreset:
    """The architecture of a checkpoint of this project: its marker's preset, or (a training checkpoint
    whose marker has none) the architecture the run resolved from the config saved with it."""
    marker = read_marker(path)
    preset = _recorded_preset(marker)
    if preset is None:
        raise MarkerError(f"{marker.path / MARKER_FILE} records no preset (and no {CONFIG_FILE} says which model "
                          "it was trained from); give the architecture explicitly (e.g. --preset NAME)")
    return preset


def checkpoint_dtype(path: str | os.PathLike) -> str | None:
    """The params dtype a checkpoint's weights were saved in (its marker's, else its saved config's)."""
    marker = read_marker(path)
    if marker.dtype:
        return marker.dtype
    saved = saved_model_config(path) if marker.kind == TRAINED else None
    return saved.params_dtype if saved is not None else None


def resolve_preset(model: ModelConfig) -> ModelPreset:
    """The architecture: read from model.hf_model's config.json or model.checkpoint's marker, else model.preset."""
    if model.hf_model:
        return _check_named_preset(model, infer_preset_from_hf(model.hf_model), f"model.hf_model={model.hf_model}")
    if model.checkpoint:
        marker = find_marker(model.checkpoint)
        recorded = _recorded_preset(marker) if marker is not None else None
        if recorded is not None:
            return _check_named_preset(model, recorded, f"model.checkpoint={model.checkpoint}")
        if model.preset == _DEFAULT_PRESET:
            logger.warning("model.checkpoint=%s has no %s with its preset; assuming model.preset=%s",
                           model.checkpoint, MARKER_FILE, model.preset)
    return get_preset(model.preset)


def hf_config_of(model: ModelConfig) -> dict[str, Any] | None:
    """The HF config.json of the initial model (kept with training checkpoints for conversion back to HF)."""
    candidates = []
    if model.hf_model:
        candidates.append(pathlib.Path(model.hf_model) / HF_CONFIG_FILE)
    if model.checkpoint:
        candidates.append(pathlib.Path(model.checkpoint) / ASSETS_DIR / HF_CONFIG_FILE)
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    return None


# ------------------------------------------------------------------------------------ tokenizer
def resolve_tokenizer_dir(model: ModelConfig) -> str:
    """model.tokenizer, else model.hf_model, else the tokenizer saved with model.checkpoint (hf_assets/)."""
    if model.tokenizer:
        return model.tokenizer
    if model.hf_model:
        return model.hf_model
    stored = stored_tokenizer_dir(model.checkpoint) if model.checkpoint else None
    if stored is not None:
        return str(stored)
    raise ValueError("no tokenizer for this model: set model.tokenizer (a Hugging Face tokenizer directory), or "
                     f"model.hf_model / a model.checkpoint that carries its tokenizer in {ASSETS_DIR}/")


# ------------------------------------------------------------------------------------ model
def seed_everything(seed: int) -> None:
    """Seeds torch (CPU and CUDA) and Megatron's model-parallel RNG tracker."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def load_model(model: ModelConfig, parallel: ParallelContext | ParallelConfig | None = None,
               preset: ModelPreset | None = None, load_weights: bool = True) -> list:
    """This rank's GPTModel chunks (one, or `virtual_pp`) holding the weights `model` names.

    The process groups must be initialized for `parallel` (the ParallelContext of initialize_parallel,
    or a ParallelConfig with its sizes: `parallel.session.parallel_session` / `ensure_parallel`). The
    chunks are on the GPU when there is one, in `model.params_dtype` with `model.attention_backend`.
    `preset` defaults to `resolve_preset(model)`. Random initialization is seeded by model.init_seed
    (the builder draws the full weights on the CPU and splits them, so every TP layout starts equal).
    load_weights=False leaves the weights uninitialized: for a resumed run, which loads them next.
    """
    parallel = parallel or ParallelConfig()
    preset = preset or resolve_preset(model)
    seed_everything(model.init_seed)
    # random init only when nothing overwrites it (for a 7B+ model it costs minutes on the CPU)
    from_elsewhere = bool(model.hf_model or model.checkpoint) or not load_weights
    chunks = build_model_chunks(preset, parallel, model, initialize_weights=not from_elsewhere)
    if load_weights and model.hf_model:
        _load_hf_weights(chunks, model.hf_model, preset)
    elif load_weights and model.checkpoint:
        load_model_weights(model.checkpoint, chunks)
    return chunks


def _load_hf_weights(chunks: list, hf_dir: str, preset: ModelPreset) -> None:
    """Every chunk's TP shard / PP stage read from the safetensors files (one tensor at a time)."""
    with HFCheckpointReader(hf_dir) as reader:
        check_hf_names(reader, preset)
        for chunk in chunks:
            load_hf_weights(chunk, reader, preset)
