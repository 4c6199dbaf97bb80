"""Hugging Face checkpoints on the model side: config.json <-> `ModelPreset`, the safetensors reader and
writer, and the loading of HF weights into a built GPTModel chunk through the family's table.

    config.py           infer_preset_from_hf, hf_config_from_preset, UnsupportedHFConfig
    safetensors_io.py   HFCheckpointReader (lazy, per-slice reads), HFShardWriter, copy_hf_assets
    loading.py          check_hf_names, check_hf_model, load_hf_weights

The families themselves (names, config quirks, weight tables) are in model/families/. checkpoint/ (the
one loader) reads HF directories through this package; convert/ adds the commands on top.
"""

from megatron_solopo.model.hf.config import (
    UnsupportedHFConfig,
    family_of_config,
    hf_config_from_preset,
    infer_preset_from_hf,
    read_hf_config,
)
from megatron_solopo.model.hf.loading import check_hf_model, check_hf_names, load_hf_weights
from megatron_solopo.model.hf.safetensors_io import HFCheckpointReader, HFShardWriter, UnreadableCheckpoint

__all__ = [
    "HFCheckpointReader",
    "HFShardWriter",
    "UnreadableCheckpoint",
    "UnsupportedHFConfig",
    "check_hf_model",
    "check_hf_names",
    "family_of_config",
    "hf_config_from_preset",
    "infer_preset_from_hf",
    "load_hf_weights",
    "read_hf_config",
]
