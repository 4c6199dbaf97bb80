"""Training: the SoLoPO step on Megatron-Core, the run loop, reference log-probs, checkpoints, logging.

Only the config is imported here; the engine modules (loop, step, checkpointing, ...) pull in
torch and Megatron-Core and are imported where they are used.
"""

from megatron_solopo.training.config import TrainConfig

__all__ = ["TrainConfig"]
