"""megatron_solopo: long-context preference alignment (SoLoPO) on NVIDIA Megatron-Core."""

__version__ = "0.1.0"
