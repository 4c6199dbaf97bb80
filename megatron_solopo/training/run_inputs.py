"""What a training run and a reference precompute share: the model's architecture, its initial weights,
the tokenizer, the tokenized dataset, and an identity of the initial model.

The initial model comes from exactly one of: `model.hf_model` (a Hugging Face directory, converted on
load), `model.checkpoint` (a Megatron distributed checkpoint: converted by `solopo convert
hf-to-mcore`, or a training checkpoint step_N) or random initialization of `model.preset` (seeded by
`model.init_seed`, identical for every TP/PP layout). The architecture, the tokenizer directory and
the model itself are resolved and loaded by the checkpoint room (`checkpoint.load_model`).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from megatron_solopo.checkpoint.fingerprint import file_fingerprints
from megatron_solopo.checkpoint.format import stored_tokenizer_dir
from megatron_solopo.checkpoint.loader import load_model, resolve_tokenizer_dir
from megatron_solopo.checkpoint.weights import unwrap_model
from megatron_solopo.data.tokenization import check_tokenizer_fits_model, load_tokenized_pairs, load_tokenizer
from megatron_solopo.model.config import ModelConfig
from megatron_solopo.model.presets import ModelPreset
from megatron_solopo.parallel.config import ParallelConfig
from megatron_solopo.parallel.session import barrier, is_rank0

# ------------------------------------------------------------------------------------ tokenizer
def load_run_tokenizer(model: ModelConfig, preset: ModelPreset):
    """The tokenizer, checked against the model's vocabulary (a larger tokenizer would index past it)."""
    path = resolve_tokenizer_dir(model)
    tokenizer = load_tokenizer(path)
    # a tokenizer named next to a model that carries its own must be that one
    own = (model.hf_model or (stored_tokenizer_dir(model.checkpoint) if model.checkpoint else None)
           if model.tokenizer else None)
    check_tokenizer_fits_model(tokenizer, path, preset.vocab_size, f"the model ({preset.name})", own)
    return tokenizer


def pad_token_id(tokenizer) -> int:
    """Token id used for padding (never scored): pad, else eos, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


# ------------------------------------------------------------------------------------ data
def load_dataset(data_config, tokenizer):
    """The tokenized pairs (data/tokenization.py); rank 0 builds the cache first, the others then load it."""
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
def build_initial_model(model: ModelConfig, parallel: ParallelConfig, preset: ModelPreset,
                        load_weights: bool = True) -> list:
    """This rank's GPTModel chunks holding the initial weights (`checkpoint.load_model`), on the GPU
    when there is one. load_weights=False leaves them uninitialized: for a resumed run, which loads
    them next."""
    return load_model(model, parallel, preset, load_weights=load_weights)


def attention_backend_of(chunks: list) -> str:
    """The resolved attention backend the builder used (te | sdpa | local)."""
    return unwrap_model(chunks[0]).attention_backend_name


# ------------------------------------------------------------------------------------ identity
def _weight_fingerprints(directory: str, suffixes: tuple[str, ...]) -> dict[str, str]:
    fingerprints = file_fingerprints(directory, suffixes)
    if not fingerprints:
        raise FileNotFoundError(f"{directory} holds no weight files ({', '.join(suffixes)})")
    return fingerprints


def model_identity(model: ModelConfig, preset: ModelPreset) -> dict[str, Any]:
    """What determines the initial model's log-probs: architecture, dtype and the weights' source.

    Weights are identified by content fingerprints of their files (HF safetensors, dist checkpoint
    shards), or by the seed for a random initialization; paths are not part of it, so moving a
    checkpoint keeps its identity.
    """
    identity: dict[str, Any] = {"preset": dataclasses.asdict(dataclasses.replace(preset, name="")),
                                "params_dtype": model.params_dtype}
    if model.hf_model:
        identity["weights"] = {"hf": _weight_fingerprints(model.hf_model, (".safetensors", "config.json"))}
    elif model.checkpoint:
        identity["weights"] = {"checkpoint": _weight_fingerprints(model.checkpoint, (".distcp", ".metadata"))}
    else:
        identity["weights"] = {"random_init_seed": model.init_seed}
    return identity
