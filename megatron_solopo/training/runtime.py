"""What a training run and a reference precompute share: the model's architecture, its initial weights,
the tokenizer, the tokenized dataset, and an identity of the initial model.

The initial model comes from exactly one of: `model.hf_model` (a Hugging Face directory, converted on
load), `model.checkpoint` (a Megatron distributed checkpoint: converted by `solopo convert
hf-to-mcore`, or a training checkpoint step_N) or random initialization of `model.preset` (seeded by
`model.init_seed`, identical for every TP/PP layout).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from typing import Any

import torch

from megatron_solopo.model.config import ModelConfig
from megatron_solopo.model.presets import ModelPreset, get_preset
from megatron_solopo.parallel.config import ParallelConfig
from megatron_solopo.parallel.session import barrier, is_rank0
from megatron_solopo.training.checkpointing import ASSETS_SUBDIR, load_model_weights, read_marker

logger = logging.getLogger(__name__)

_DEFAULT_PRESET = ModelConfig().preset
_FINGERPRINT_BYTES = 1 << 20


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


def resolve_preset(model: ModelConfig) -> ModelPreset:
    """The architecture: read from model.hf_model's config.json or model.checkpoint's marker, else model.preset."""
    if model.hf_model:
        from megatron_solopo.convert.presets_from_hf import infer_preset_from_hf

        return _check_named_preset(model, infer_preset_from_hf(model.hf_model), f"model.hf_model={model.hf_model}")
    if model.checkpoint:
        marker = read_marker(model.checkpoint)
        if marker is not None and "preset" in marker:
            return _check_named_preset(model, ModelPreset(**marker["preset"]), f"model.checkpoint={model.checkpoint}")
        if model.preset == _DEFAULT_PRESET:
            logger.warning("model.checkpoint=%s has no solopo_checkpoint.json with its preset; assuming "
                           "model.preset=%s", model.checkpoint, model.preset)
    return get_preset(model.preset)


def hf_config_of(model: ModelConfig) -> dict[str, Any] | None:
    """The HF config.json of the initial model (kept with training checkpoints for conversion back to HF)."""
    candidates = []
    if model.hf_model:
        candidates.append(pathlib.Path(model.hf_model) / "config.json")
    if model.checkpoint:
        candidates.append(pathlib.Path(model.checkpoint) / ASSETS_SUBDIR / "config.json")
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    return None


# ------------------------------------------------------------------------------------ tokenizer
def resolve_tokenizer_dir(model: ModelConfig) -> str:
    """model.tokenizer, else model.hf_model, else the hf_assets/ saved with model.checkpoint."""
    if model.tokenizer:
        return model.tokenizer
    if model.hf_model:
        return model.hf_model
    if model.checkpoint and (pathlib.Path(model.checkpoint) / ASSETS_SUBDIR).is_dir():
        return str(pathlib.Path(model.checkpoint) / ASSETS_SUBDIR)
    raise ValueError("no tokenizer for this run: set model.tokenizer (a Hugging Face tokenizer directory), or "
                     "model.hf_model / a model.checkpoint that carries hf_assets/")


def load_run_tokenizer(model: ModelConfig, preset: ModelPreset):
    """The tokenizer, checked against the model's vocabulary (a larger tokenizer would index past it)."""
    from megatron_solopo.data.tokenize import load_tokenizer

    path = resolve_tokenizer_dir(model)
    tokenizer = load_tokenizer(path)
    if len(tokenizer) > preset.vocab_size:
        raise ValueError(f"the tokenizer at {path} has {len(tokenizer)} tokens but the model ({preset.name}) has a "
                         f"vocabulary of {preset.vocab_size}; use the model's own tokenizer (model.tokenizer)")
    return tokenizer


def pad_token_id(tokenizer) -> int:
    """Token id used for padding (never scored): pad, else eos, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


# ------------------------------------------------------------------------------------ data
def load_dataset(data_config, tokenizer):
    """The tokenized pairs (data/tokenize.py); rank 0 builds the cache first, the others then load it."""
    from megatron_solopo.data.tokenize import load_tokenized_pairs

    pairs_path = data_config.resolved_pairs_path
    if not pathlib.Path(pairs_path).is_file():
        raise FileNotFoundError(f"no preference pairs at {pairs_path}: run `solopo build-data --config <config>` "
                                "first, or set data.pairs_path")
    dataset = load_tokenized_pairs(pairs_path, tokenizer, data_config) if is_rank0() else None
    barrier()
    if dataset is None:
        dataset = load_tokenized_pairs(pairs_path, tokenizer, data_config)
    return dataset


# ------------------------------------------------------------------------------------ model
def seed_everything(seed: int) -> None:
    """Seeds torch (CPU and CUDA) and Megatron's model-parallel RNG tracker."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def build_initial_model(model: ModelConfig, parallel: ParallelConfig, preset: ModelPreset,
                        load_weights: bool = True) -> list:
    """This rank's GPTModel chunks holding the initial weights, on the GPU when there is one.

    Megatron's parallel state must be initialized. Random initialization is seeded by model.init_seed
    (the builder draws the full weights on the CPU and splits them, so every layout starts equal).
    load_weights=False leaves the weights uninitialized: for a resumed run, which loads them next.
    """
    from megatron_solopo.model.builder import build_model_chunks

    seed_everything(model.init_seed)
    # random init only when nothing overwrites it (for a 7B+ model it costs minutes on the CPU)
    from_elsewhere = bool(model.hf_model or model.checkpoint) or not load_weights
    chunks = build_model_chunks(preset, parallel, model, initialize_weights=not from_elsewhere)
    if model.hf_model and load_weights:
        from megatron_solopo.convert.hf_io import HFCheckpointReader
        from megatron_solopo.convert.hf_to_mcore import check_hf_names, load_hf_weights
        from megatron_solopo.convert.mappings import get_mapping

        with HFCheckpointReader(model.hf_model) as reader:
            check_hf_names(reader, get_mapping(preset.architecture), preset)
            for chunk in chunks:
                load_hf_weights(chunk, reader, preset)
    if model.checkpoint and load_weights:
        load_model_weights(model.checkpoint, chunks)
    return chunks


def attention_backend_of(chunks: list) -> str:
    """The resolved attention backend the builder used (te | sdpa | local)."""
    from megatron_solopo.training.checkpointing import unwrap_model

    return unwrap_model(chunks[0]).attention_backend_name


# ------------------------------------------------------------------------------------ identity
def _file_fingerprint(path: pathlib.Path) -> str:
    """Size + the first and last MiB: cheap, survives copies, changes when weights are replaced."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
        if path.stat().st_size > 2 * _FINGERPRINT_BYTES:
            f.seek(-_FINGERPRINT_BYTES, os.SEEK_END)
            h.update(f.read(_FINGERPRINT_BYTES))
    return h.hexdigest()


def _directory_fingerprint(directory: pathlib.Path, suffixes: tuple[str, ...]) -> dict[str, str]:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(suffixes))
    if not files:
        raise FileNotFoundError(f"{directory} holds no weight files ({', '.join(suffixes)})")
    return {p.name: _file_fingerprint(p) for p in files}


def model_identity(model: ModelConfig, preset: ModelPreset) -> dict[str, Any]:
    """What determines the initial model's log-probs: architecture, dtype and the weights' source.

    Weights are identified by content fingerprints of their files (HF safetensors, dist checkpoint
    shards), or by the seed for a random initialization; paths are not part of it, so moving a
    checkpoint keeps its identity.
    """
    identity: dict[str, Any] = {"preset": dataclasses.asdict(dataclasses.replace(preset, name="")),
                                "params_dtype": model.params_dtype}
    if model.hf_model:
        identity["weights"] = {"hf": _directory_fingerprint(pathlib.Path(model.hf_model),
                                                            (".safetensors", "config.json"))}
    elif model.checkpoint:
        identity["weights"] = {"checkpoint": _directory_fingerprint(pathlib.Path(model.checkpoint),
                                                                    (".distcp", ".metadata"))}
    else:
        identity["weights"] = {"random_init_seed": model.init_seed}
    return identity
