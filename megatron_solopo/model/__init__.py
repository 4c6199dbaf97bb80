"""Model presets, the Megatron-Core GPTModel builder, attention kernels and log-prob heads."""

from megatron_solopo.model.config import ModelConfig
from megatron_solopo.model.presets import ModelPreset, get_preset, list_presets, register_preset

__all__ = ["ModelConfig", "ModelPreset", "get_preset", "list_presets", "register_preset"]
