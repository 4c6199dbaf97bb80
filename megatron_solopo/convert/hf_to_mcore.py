"""Hugging Face checkpoint -> Megatron-Core GPTModel (in memory) or distributed checkpoint (on disk).

The drivers only: reading config.json, the safetensors files and the family's weight table is
model/hf/ (through `checkpoint.load_model`, the one loader); this module builds, saves and marks.
Each rank reads only its own shard of each tensor (its TP slice, its PP stage's layers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
import time
import warnings
from collections.abc import Iterator

import torch

from megatron_solopo.checkpoint.format import ASSETS_DIR, CONVERTED, write_manifest, write_marker
from megatron_solopo.checkpoint.loader import load_model
from megatron_solopo.console import check_writable_dir
from megatron_solopo.model.config import ModelConfig
from megatron_solopo.model.hf import loading as _hf_loading
from megatron_solopo.model.hf.config import infer_preset_from_hf, read_hf_config
from megatron_solopo.model.hf.safetensors_io import copy_hf_assets
from megatron_solopo.model.presets import ModelPreset
from megatron_solopo.parallel import ParallelConfig
from megatron_solopo.parallel.session import barrier, check_on_rank0, ensure_parallel, is_rank0, parallel_session

# Moved to model/hf/loading.py (checkpoint/ needs them and must not import convert/); the old import
# path still works, with a DeprecationWarning, for code written against it.
_MOVED = ("check_hf_model", "load_hf_weights", "weight_state", "layer_offset")


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(f"megatron_solopo.convert.hf_to_mcore.{name} moved to megatron_solopo.model.hf.loading."
                      f"{name}; import it from there", DeprecationWarning, stacklevel=2)
        return getattr(_hf_loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
