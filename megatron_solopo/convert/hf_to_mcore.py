"""Hugging Face checkpoint -> Megatron-Core GPTModel (in memory) or distributed checkpoint (on disk).

Each rank reads only its own shard of each tensor (its TP slice, its PP stage's layers) from the
safetensors files, one tensor at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
import time
from collections.abc import Iterator

import torch

from megatron_solopo.checkpoint.format import ASSETS_DIR, CONVERTED, write_manifest, write_marker
from megatron_solopo.convert.hf_io import HFCheckpointReader, copy_hf_assets
from megatron_solopo.convert.mappings import (
    ArchitectureMapping,
    Geometry,
    HFShapeMismatch,
    OutputLayer,
    expected_hf_shape,
    get_mapping,
    te_alias,
)
from megatron_solopo.convert.presets_from_hf import infer_preset_from_hf, read_hf_config
from megatron_solopo.parallel.session import barrier, check_on_rank0, ensure_parallel, is_rank0, parallel_session
from megatron_solopo.model.config import ModelConfig
from megatron_solopo.model.presets import ModelPreset
from megatron_solopo.parallel import ParallelConfig


def check_hf_names(reader: HFCheckpointReader, mapping: ArchitectureMapping, preset: ModelPreset) -> None:
    """Every tensor the preset needs is in the files and every file tensor is used; tied checkpoints
    that still store lm_head must store the embedding there (else the config lies)."""
    tied = preset.tie_embeddings
    expected = mapping.expected_hf_names(preset.num_layers, tied)
    present = {n for n in reader.names() if not n.endswith(mapping.ignored_hf_suffixes)}
    output = next(m for m in mapping.global_mappings if isinstance(m, OutputLayer))
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
        raise ValueError(f"{reader.hf_dir}: the {mapping.hf_architecture} table does not match the files: "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected "
                         f"{extra[:8]}{'...' if len(extra) > 8 else ''} (an unsupported bias or layer type?)")
    wrong = [(name, tuple(reader.shape(name)), shape) for name in sorted(expected)
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
        check_hf_names(reader, get_mapping(preset.architecture), preset)
    return preset


def _resolve_name(state: dict, mcore_name: str) -> str | None:
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
    mapping, geom = get_mapping(preset.architecture), Geometry.of(preset)
    state = weight_state(model)
    filled = set()
    for mcore_name, entry in mapping.instances(len(model.decoder.layers), layer_offset(model)):
        name = _resolve_name(state, mcore_name)
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
        raise ValueError(f"the {mapping.hf_architecture} table has no HF source for {unfilled}; the model "
                         "was built with a layout the table does not describe")


def _geometry_mismatch(reader: HFCheckpointReader, hf_names, preset: ModelPreset, err: BaseException) -> str:
    shapes = ", ".join(f"{n} {tuple(reader.shape(n))}" for n in hf_names if n in reader)
    return (f"{pathlib.Path(reader.hf_dir) / 'config.json'} does not match the weights: {shapes} cannot be split "
            f"with hidden_size={preset.hidden_size}, num_attention_heads={preset.num_attention_heads}, "
            f"num_key_value_heads={preset.num_query_groups}, head_dim={preset.head_dim}, "
            f"intermediate_size={preset.ffn_hidden_size} ({' '.join(str(err).split())[:200]}); fix config.json or "
            "use the weights it was written for")


def load_hf_into_mcore(hf_dir: str | os.PathLike, parallel_config: ParallelConfig | None = None,
                       model_config: ModelConfig | None = None, preset: ModelPreset | None = None):
    """A Megatron-Core GPTModel (this rank's chunk) holding the weights of a HF checkpoint.

    A convenience over `checkpoint.load_model` (the one loader) for one chunk: with no process group
    yet, a single-process one is set up (gloo on CPU). The model is built by
    `model.builder.build_gpt_model` (on the GPU when there is one) and used as usual:
    `model(input_ids, position_ids, attention_mask)` -> logits [b, s, vocab / tp].

    Args:
        hf_dir: Llama / Qwen2 / Mistral checkpoint directory (config.json + safetensors).
        parallel_config: TP/PP/CP layout; `ParallelConfig()` = one process. Not interleaved
            (for virtual pipeline stages call `checkpoint.load_model`, which returns every chunk).
        model_config: precision and kernels; default `ModelConfig(hf_model=hf_dir)`.
        preset: the architecture; default inferred from config.json (`infer_preset_from_hf`).
    """
    from megatron_solopo.checkpoint.loader import load_model

    parallel = parallel_config or ParallelConfig()
    if parallel.virtual_pp:
        raise ValueError("load_hf_into_mcore builds one model chunk; with virtual_pp call "
                         "checkpoint.load_model, which returns every chunk")
    preset = preset or infer_preset_from_hf(hf_dir)
    model_config = dataclasses.replace(model_config or ModelConfig(), hf_model=str(hf_dir), checkpoint=None)
    ensure_parallel(parallel)
    return load_model(model_config, parallel, preset)[0]


def checkpoint_metadata(preset: ModelPreset, dtype: str, parallel: ParallelConfig, source: str,
                        hf_config: dict | None) -> dict:
    """What the marker of a converted checkpoint records besides its format and kind (checkpoint/format.py)."""
    import megatron.core
    import transformers

    return {
        "preset": dataclasses.asdict(preset),
        "dtype": dtype,
        "source": source,
        "saved_with": {"tp": parallel.tp, "pp": parallel.pp},
        "hf_config": hf_config,
        "hf_assets_dir": ASSETS_DIR,
        "versions": {"megatron_core": getattr(megatron.core, "__version__", "?"),
                     "transformers": transformers.__version__, "torch": torch.__version__},
    }


def check_output_dir(out_dir: pathlib.Path) -> None:
    """A conversion writes into a new or empty, writable directory only (never mixes with old files)."""
    from megatron_solopo.console import check_writable_dir

    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--output {out_dir} is a file; give a new or empty directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output directory {out_dir} is not empty; choose a new directory or remove it")
    check_writable_dir(out_dir, "--output")


@contextlib.contextmanager
def fresh_output_dir(out_dir: pathlib.Path) -> Iterator[None]:
    """Checks --output (`check_output_dir`, on rank 0) and, when the conversion then fails, removes what it
    wrote there (rank 0): a failed conversion leaves no half-written or empty --output behind."""
    existed = out_dir.exists()
    check_on_rank0(lambda: check_output_dir(out_dir))
    try:
        yield
    except BaseException:
        if is_rank0():
            if existed:  # it was empty: empty it again
                for child in list(out_dir.iterdir()) if out_dir.is_dir() else []:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            else:
                shutil.rmtree(out_dir, ignore_errors=True)
        raise


def convert_hf_to_mcore(hf_dir: str | os.PathLike, out_dir: str | os.PathLike,
                        parallel: ParallelConfig | None = None, dtype: str = "bf16",
                        log=print) -> pathlib.Path:
    """Writes a Megatron-Core distributed checkpoint of a HF model, plus its assets and metadata.

    Layout of `out_dir`: the `dist_checkpointing` files (`.metadata`, `*.distcp`, `metadata.json`),
    `hf_assets/` (config.json, tokenizer files, generation config, chat template, license) and
    `solopo_checkpoint.json` (the completion marker), then `manifest.json` (every file's size, verified by
    every reader). A failed conversion removes what it wrote (`fresh_output_dir`). The checkpoint loads at any TP/PP (dist_checkpointing
    reshards), so converting at tp=pp=1 in one process is enough; `parallel` with tp/pp > 1 needs that
    many processes (torchrun) and only splits the reading work.
    """
    hf_dir, out_dir = pathlib.Path(hf_dir), pathlib.Path(out_dir)
    parallel = parallel or ParallelConfig()
    preset = infer_preset_from_hf(hf_dir)  # config errors before the (slow) Megatron import

    from megatron.core import dist_checkpointing

    from megatron_solopo.checkpoint.loader import load_model

    start = time.perf_counter()
    with parallel_session(parallel, backend="gloo"), fresh_output_dir(out_dir):
        rank0 = is_rank0()
        if rank0:
            out_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        # the local spec has the same checkpoint keys as the TE spec and builds on any machine
        model_config = ModelConfig(hf_model=str(hf_dir), attention_backend="local", params_dtype=dtype)
        model = load_model(model_config, parallel, preset)[0]
        if rank0:
            log(f"loaded {hf_dir} into Megatron ({preset.num_parameters() / 1e6:.1f}M parameters, {dtype}) "
                f"in {time.perf_counter() - start:.1f} s")
        dist_checkpointing.save(model.sharded_state_dict(), str(out_dir))
        barrier()
        if rank0:
            copy_hf_assets(hf_dir, out_dir / ASSETS_DIR)
            meta = checkpoint_metadata(preset, dtype, parallel, str(hf_dir.resolve()), read_hf_config(hf_dir))
            write_marker(out_dir, CONVERTED, meta)  # the completion marker
            write_manifest(out_dir)  # then every file's size, which every reader verifies (check_checkpoint)
        barrier()
    if rank0:
        log(f"wrote the Megatron-Core checkpoint {out_dir} in {time.perf_counter() - start:.1f} s")
    return out_dir
