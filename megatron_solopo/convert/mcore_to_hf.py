"""Megatron-Core distributed checkpoint -> Hugging Face safetensors checkpoint.

The checkpoint is loaded at tp=pp=1 in one process (dist_checkpointing reshards from whatever layout
it was saved with), then written tensor by tensor through its family's weight table (model/families/)
into safetensors shards, with config.json and the tokenizer / generation-config files.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Iterator

import torch

from megatron_solopo.checkpoint.format import ASSETS_DIR, CheckpointMarker, marker_path, read_marker
from megatron_solopo.checkpoint.loader import checkpoint_dtype, checkpoint_preset, load_model
from megatron_solopo.convert.hf_to_mcore import fresh_output_dir
from megatron_solopo.model.config import ModelConfig
from megatron_solopo.model.families import get_family
from megatron_solopo.model.families.tables import Geometry
from megatron_solopo.model.hf.config import (
    TORCH_DTYPE_NAMES,
    UnsupportedHFConfig,
    hf_config_from_preset,
    infer_preset_from_hf,
)
from megatron_solopo.model.hf.loading import resolve_name, weight_state
from megatron_solopo.model.hf.safetensors_io import HFShardWriter, copy_hf_assets, parse_size
from megatron_solopo.model.presets import ModelPreset, get_preset
from megatron_solopo.parallel import ParallelConfig
from megatron_solopo.parallel.session import barrier, is_rank0, parallel_session

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _read_marker(ckpt_dir: str | os.PathLike) -> CheckpointMarker:
    if not marker_path(ckpt_dir).is_file():
        raise FileNotFoundError(f"{marker_path(ckpt_dir)} does not exist: {ckpt_dir} is not a complete checkpoint "
                                "of this project (pass --preset for other Megatron checkpoints)")
    return read_marker(ckpt_dir)


def read_checkpoint_metadata(ckpt_dir: str | os.PathLike) -> dict:
    """The fields of a checkpoint's `solopo_checkpoint.json` (FileNotFoundError with a hint if absent)."""
    return _read_marker(ckpt_dir).fields


def preset_from_checkpoint(ckpt_dir: str | os.PathLike) -> ModelPreset:
    """The architecture a converted or training checkpoint was written with (`checkpoint.checkpoint_preset`)."""
    return checkpoint_preset(ckpt_dir)


def load_mcore_checkpoint(ckpt_dir: str | os.PathLike, preset: ModelPreset,
                          parallel: ParallelConfig | None = None, params_dtype: str = "fp32",
                          attention_backend: str = "local"):
    """A GPTModel chunk for this rank with the weights of a Megatron distributed checkpoint (any saved
    layout; Megatron's parallel state must match `parallel`, see parallel.session.ensure_parallel).
    One chunk of `checkpoint.load_model`, the one loader."""
    parallel = parallel or ParallelConfig()
    if parallel.virtual_pp:
        raise ValueError("load_mcore_checkpoint builds one model chunk; with virtual_pp call "
                         "checkpoint.load_model, which returns every chunk")
    model_config = ModelConfig(checkpoint=str(ckpt_dir), params_dtype=params_dtype,
                               attention_backend=attention_backend)
    return load_model(model_config, parallel, preset)[0]


def iter_hf_tensors(model, preset: ModelPreset) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every weight of a complete model (tp=pp=1), in table order."""
    family, geom = get_family(preset.architecture), Geometry.of(preset)
    state = weight_state(model)
    embedding = state.get("embedding.word_embeddings.weight")
    if (len(model.decoder.layers) != preset.num_layers or embedding is None
            or embedding.shape[0] != preset.vocab_size):
        raise ValueError("iter_hf_tensors needs the whole model in one process (tp=pp=1); load the "
                         "distributed checkpoint at tp=pp=1 first (it reshards)")
    used = set()
    for mcore_name, entry in family.weights.instances(len(model.decoder.layers), 0):
        name = resolve_name(state, mcore_name)
        if name is None:
            if entry.hf_names(preset.tie_embeddings):
                raise ValueError(f"the model has no {mcore_name}, which {entry.hf_names()} come from")
            continue  # tied output layer: HF stores no lm_head
        used.add(name)
        yield from entry.to_hf(state[name].detach(), geom, tied=preset.tie_embeddings).items()
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"model tensors {unused} have no HF name in the {family.hf_architecture} table")


def hf_config_for_export(preset: ModelPreset, dtype: str, source_config: dict | None) -> dict:
    """The source config.json when it still describes `preset` (keeps token ids, names, extras), else
    one generated from the preset; the dtype field set to `dtype`."""
    config = None
    if source_config:
        try:
            if infer_preset_from_hf(source_config, name=preset.name) == preset:
                config = dict(source_config)
        except UnsupportedHFConfig:
            config = None
    if config is None:
        return hf_config_from_preset(preset, dtype)
    key = "dtype" if "dtype" in config else "torch_dtype"
    config[key] = TORCH_DTYPE_NAMES[dtype]
    return config


def write_hf_checkpoint(model, preset: ModelPreset, out_dir: str | os.PathLike, dtype: str,
                        source_config: dict | None = None, assets_dir: str | os.PathLike | None = None,
                        max_shard_bytes: int = 5 * 10**9) -> list[str]:
    """Writes a complete (tp=pp=1) model as HF safetensors shards + config.json (+ assets)."""
    out_dir = pathlib.Path(out_dir)
    writer = HFShardWriter(out_dir, max_shard_bytes)
    for name, tensor in iter_hf_tensors(model, preset):
        writer.add(name, tensor.to(_TORCH_DTYPES[dtype]))
    shards = writer.finish()
    if assets_dir is not None and pathlib.Path(assets_dir).is_dir():
        copy_hf_assets(assets_dir, out_dir, exclude=("config.json",))
    config = hf_config_for_export(preset, dtype, source_config)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return shards


def convert_mcore_to_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike,
                        max_shard_size: str | int = "5GB", dtype: str | None = None,
                        preset: ModelPreset | str | None = None, assets_dir: str | os.PathLike | None = None,
                        log=print) -> pathlib.Path:
    """Converts a Megatron distributed checkpoint to a HF checkpoint directory.

    Args:
        ckpt_dir: a converted (`convert_hf_to_mcore`) or training (step_N) checkpoint (or any Megatron
            GPT checkpoint with the same keys, given `preset`).
        out_dir: new or empty directory for the HF files.
        max_shard_size: largest safetensors file, e.g. '5GB' or a byte count.
        dtype: fp32 | bf16 | fp16; default the checkpoint's dtype (`checkpoint.checkpoint_dtype`), else bf16.
        preset: architecture (object or registered name); default the checkpoint's
            (`checkpoint.checkpoint_preset`: its marker, or a training run's saved config).
        assets_dir: tokenizer/config files to copy; default the checkpoint's hf_assets/.
    """
    ckpt_dir, out_dir = pathlib.Path(ckpt_dir), pathlib.Path(out_dir)
    marker = None
    if preset is None:
        marker = _read_marker(ckpt_dir)
        preset = checkpoint_preset(ckpt_dir)
    elif isinstance(preset, str):
        preset = get_preset(preset)
    dtype = dtype or (checkpoint_dtype(ckpt_dir) if marker is not None else None) or "bf16"
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_TORCH_DTYPES)}")
    assets = (pathlib.Path(assets_dir) if assets_dir
              else marker.assets_dir if marker is not None else ckpt_dir / ASSETS_DIR)
    source_config = marker.hf_config if marker is not None else None
    max_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    start = time.perf_counter()
    with parallel_session(ParallelConfig(), backend="gloo"), fresh_output_dir(out_dir):
        # tp=pp=1 (dist_checkpointing reshards whatever layout saved it); the local spec builds anywhere
        model_config = ModelConfig(checkpoint=str(ckpt_dir), params_dtype=dtype, attention_backend="local")
        model = load_model(model_config, ParallelConfig(), preset)[0]
        if is_rank0():
            log(f"loaded {ckpt_dir} ({preset.num_parameters() / 1e6:.1f}M parameters) in "
                f"{time.perf_counter() - start:.1f} s")
            shards = write_hf_checkpoint(model, preset, out_dir, dtype, source_config, assets, max_bytes)
            log(f"wrote {len(shards)} safetensors shard(s) + config.json to {out_dir} in "
                f"{time.perf_counter() - start:.1f} s")
        barrier()
    return out_dir
