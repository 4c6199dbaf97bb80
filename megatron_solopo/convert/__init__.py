"""Hugging Face <-> Megatron-Core checkpoint conversion and the embedded default model.

    from megatron_solopo.convert import load_hf_into_mcore
    model = load_hf_into_mcore("path/to/hf_model")          # one process, gloo on CPU if needed
    logits = model(input_ids, position_ids, None)           # [b, s, vocab / tp]

Name tables: `mappings.py` (one per architecture); docs/conversion.md lists them.
"""

from megatron_solopo.convert.default_model import default_cache_dir, ensure_default_model
from megatron_solopo.convert.hf_to_mcore import convert_hf_to_mcore, load_hf_into_mcore, load_hf_weights
from megatron_solopo.convert.mcore_to_hf import (
    convert_mcore_to_hf,
    iter_hf_tensors,
    load_mcore_checkpoint,
    preset_from_checkpoint,
    read_checkpoint_metadata,
)
from megatron_solopo.convert.presets_from_hf import UnsupportedHFConfig, infer_preset_from_hf

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
