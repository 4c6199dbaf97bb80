"""HF safetensors weights -> a built Megatron-Core GPTModel chunk, through its family's weight table.

`checkpoint.load_model` (the one loader) calls `check_hf_names` once and `load_hf_weights` per chunk;
evaluation and sampling call `check_hf_model` before transformers loads a model. Each rank reads only
its own shard of each tensor (its TP slice, its PP stage's layers), one tensor at a time.
"""

from __future__ import annotations

import os
import pathlib

import torch

from megatron_solopo.model.families import get_family
from megatron_solopo.model.families.tables import (
    Geometry,
    HFShapeMismatch,
    expected_hf_shape,
    te_alias,
)
from megatron_solopo.model.hf.config import infer_preset_from_hf
from megatron_solopo.model.hf.safetensors_io import HFCheckpointReader
from megatron_solopo.model.presets import ModelPreset


def check_hf_names(reader: HFCheckpointReader, preset: ModelPreset) -> None:
    """Every tensor the preset's family table needs is in the files and every file tensor is used; tied
    checkpoints that still store lm_head must store the embedding there (else the config lies)."""
    family = get_family(preset.architecture)
    table, tied = family.weights, preset.tie_embeddings
    expected = table.expected_hf_names(preset.num_layers, tied)
    present = {n for n in reader.names() if not n.endswith(table.ignored_hf_suffixes)}
    output = table.output_layer
    if tied and output.hf in present:
        if not torch.equal(reader.read(output.hf), reader.read(output.tied_hf)):
            raise ValueError(f"{reader.hf_dir}: config.json says tie_word_embeddings=true but {output.hf} "
                             f"differs from {output.tied_hf}; fix tie_word_embeddings in config.json")
        present.discard(output.hf)
    if not tied and output.hf not in present:
        raise ValueError(f"{reader.hf_dir}: config.json says tie_word_embeddings=false but the checkpoint has "
                         f"no {output.hf}; set tie_word_embeddings=true if the output layer is the embedding")
    missing, extra = sorted(expected - present), sorted(present - expected)
    if missing or extra:
        raise ValueError(f"{reader.hf_dir}: the {family.hf_architecture} table does not match the files: "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected "
                         f"{extra[:8]}{'...' if len(extra) > 8 else ''} (an unsupported bias or layer type?)")
    _check_shapes(reader, sorted(expected), preset)


def _check_shapes(reader: HFCheckpointReader, names: list[str], preset: ModelPreset) -> None:
    """Shapes from the safetensors headers against those config.json implies (no tensor is read)."""
    wrong = [(name, tuple(reader.shape(name)), shape) for name in names
             if (shape := expected_hf_shape(name, preset)) is not None and tuple(reader.shape(name)) != shape]
    if wrong:
        shown = "; ".join(f"{name} is {tuple(got)}, config implies {want}" for name, got, want in wrong[:3])
        raise ValueError(f"{pathlib.Path(reader.hf_dir) / 'config.json'} does not match the weights ({shown}"
                         f"{'; ...' if len(wrong) > 3 else ''}; from hidden_size={preset.hidden_size}, "
                         f"num_attention_heads={preset.num_attention_heads}, num_key_value_heads="
                         f"{preset.num_query_groups}, head_dim={preset.head_dim}, intermediate_size="
                         f"{preset.ffn_hidden_size}, vocab_size={preset.vocab_size}); fix config.json or use the "
                         "weights it was written for")


def check_hf_model(hf_dir: str | os.PathLike) -> ModelPreset:
    """The architecture of the HF model directory `hf_dir` after checking, from the safetensors headers only,
    that its tensors are the ones and have the shapes its config.json implies (ValueError naming the file
    otherwise). What evaluation and sampling call before transformers loads the model."""
    preset = infer_preset_from_hf(hf_dir)
    with HFCheckpointReader(hf_dir) as reader:
        check_hf_names(reader, preset)
    return preset


def resolve_name(state: dict, mcore_name: str) -> str | None:
    """The name under which this model holds `mcore_name` (local spec, or TE's fused norm), or None
    when this chunk does not hold it (another pipeline stage does)."""
    if mcore_name in state:
        return mcore_name
    alias = te_alias(mcore_name)
    return alias if alias in state else None


def layer_offset(model) -> int:
    """Global index of this chunk's first transformer layer (0 without pipeline parallelism)."""
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def weight_state(model) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, without Megatron's `_extra_state` entries."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}


def load_hf_weights(model, reader: HFCheckpointReader, preset: ModelPreset, tp_rank: int | None = None,
                    tp_size: int | None = None) -> None:
    """Fills one GPTModel chunk (this rank's TP shard and PP stage) from a HF checkpoint.

    `tp_rank` / `tp_size` default to the model's tensor-parallel group (`model.pg_collection.tp`).
    Every weight of the chunk must be filled; a tensor whose shape differs is an error.
    """
    if tp_rank is None or tp_size is None:
        tp_group = model.pg_collection.tp
        tp_rank, tp_size = torch.distributed.get_rank(tp_group), torch.distributed.get_world_size(tp_group)
    family = get_family(preset.architecture)
    geom = Geometry.of(preset)
    state = weight_state(model)
    filled = set()
    for mcore_name, entry in family.weights.instances(len(model.decoder.layers), layer_offset(model)):
        name = resolve_name(state, mcore_name)
        if name is None:
            continue
        hf_names = entry.hf_names(preset.tie_embeddings)
        try:
            value = entry.to_mcore(reader, geom, tp_rank, tp_size, tied=preset.tie_embeddings)
        except (RuntimeError, IndexError, HFShapeMismatch) as err:  # the config's geometry does not fit the tensors
            raise ValueError(_geometry_mismatch(reader, hf_names, preset, err)) from None
        target = state[name]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{name}: HF tensors {hf_names} give shape "
                             f"{tuple(value.shape)} on tp rank {tp_rank}, the model expects "
                             f"{tuple(target.shape)}; does config.json match the weights?")
        with torch.no_grad():
            target.copy_(value)
        filled.add(name)
    unfilled = sorted(set(state) - filled)
    if unfilled:
        raise ValueError(f"the {family.hf_architecture} table has no HF source for {unfilled}; the model "
                         "was built with a layout the table does not describe")


def _geometry_mismatch(reader: HFCheckpointReader, hf_names, preset: ModelPreset, err: BaseException) -> str:
    shapes = ", ".join(f"{n} {tuple(reader.shape(n))}" for n in hf_names if n in reader)
    return (f"{pathlib.Path(reader.hf_dir) / 'config.json'} does not match the weights: {shapes} cannot be split "
            f"with hidden_size={preset.hidden_size}, num_attention_heads={preset.num_attention_heads}, "
            f"num_key_value_heads={preset.num_query_groups}, head_dim={preset.head_dim}, "
            f"intermediate_size={preset.ffn_hidden_size} ({' '.join(str(err).split())[:200]}); fix config.json or "
            "use the weights it was written for")
