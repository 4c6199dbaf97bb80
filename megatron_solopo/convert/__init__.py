"""Hugging Face <-> Megatron-Core checkpoint conversion and the embedded default model.

    from megatron_solopo.convert import load_hf_into_mcore
    model = load_hf_into_mcore("path/to/hf_model")          # one process, gloo on CPU if needed
    logits = model(input_ids, position_ids, None)           # [b, s, vocab / tp]

The commands and the drivers. What a family is (names, config.json quirks, weight table) lives in
model/families/ (one module per family), the config.json reader, the safetensors reader and the
weight loading in model/hf/ (docs/conversion.md); `load_hf_weights`, `infer_preset_from_hf` and
`UnsupportedHFConfig` are re-exported here from there.
"""

from megatron_solopo.convert.default_model import default_cache_dir, ensure_default_model
from megatron_solopo.convert.hf_to_mcore import convert_hf_to_mcore, load_hf_into_mcore
from megatron_solopo.convert.mcore_to_hf import (
    convert_mcore_to_hf,
    iter_hf_tensors,
    load_mcore_checkpoint,
    preset_from_checkpoint,
    read_checkpoint_metadata,
)
from megatron_solopo.model.hf import UnsupportedHFConfig, infer_preset_from_hf, load_hf_weights

__all__ = [
    "UnsupportedHFConfig",
    "convert_hf_to_mcore",
    "convert_mcore_to_hf",
    "default_cache_dir",
    "ensure_default_model",
    "infer_preset_from_hf",
    "iter_hf_tensors",
    "load_hf_into_mcore",
    "load_hf_weights",
    "load_mcore_checkpoint",
    "preset_from_checkpoint",
    "read_checkpoint_metadata",
]
