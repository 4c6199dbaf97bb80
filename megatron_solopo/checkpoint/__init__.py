"""Checkpoints and model loading: the on-disk format (marker, kind, assets, fingerprint) and the one
model loader for every source (HF directory, converted or trained checkpoint, random init).

    from megatron_solopo.checkpoint import load_model
    chunks = load_model(ModelConfig(checkpoint="run/checkpoints/step_000100"), ParallelConfig())

Training, conversion, evaluation and the benchmark load models only through `load_model`.
"""

from megatron_solopo.checkpoint.fingerprint import directory_fingerprint, file_fingerprints
from megatron_solopo.checkpoint.format import (
    ASSETS_DIR,
    CONFIG_FILE,
    CONVERTED,
    MARKER_FILE,
    TRAINED,
    CheckpointError,
    CheckpointMarker,
    MarkerError,
    find_marker,
    read_marker,
    write_marker,
)
from megatron_solopo.checkpoint.loader import (
    checkpoint_dtype,
    checkpoint_preset,
    load_model,
    resolve_preset,
    resolve_tokenizer_dir,
)
from megatron_solopo.checkpoint.weights import load_model_weights

__all__ = [
    "ASSETS_DIR",
    "CONFIG_FILE",
    "CONVERTED",
    "MARKER_FILE",
    "TRAINED",
    "CheckpointError",
    "CheckpointMarker",
    "MarkerError",
    "checkpoint_dtype",
    "checkpoint_preset",
    "directory_fingerprint",
    "file_fingerprints",
    "find_marker",
    "load_model",
    "load_model_weights",
    "read_marker",
    "resolve_preset",
    "resolve_tokenizer_dir",
    "write_marker",
]
