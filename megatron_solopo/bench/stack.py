"""Our Megatron-Core stack as a bench runner: build one variant, time `training.step.train_step`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from megatron_solopo.bench.random_pairs import synthetic_samples
from megatron_solopo.bench.config import BenchConfig, Variant
from megatron_solopo.bench.measure import free_memory
from megatron_solopo.checkpoint import load_model
from megatron_solopo.model.config import ModelConfig
from megatron_solopo.objectives import ObjectiveConfig
from megatron_solopo.parallel import current_parallel_context
from megatron_solopo.parallel.distributed import release_global_memory_buffer
from megatron_solopo.training.batching import Collator
from megatron_solopo.training.optim import build_optimizer, wrap_ddp
from megatron_solopo.training.step import train_step


class StackRunner:
    """Our Megatron-Core stack for one variant: DDP model chunks, Megatron optimizer, `train_step`."""

    def __init__(self, preset, variant: Variant, cfg: BenchConfig):
        self.preset, self.variant, self.cfg = preset, variant, cfg
        self.variant_name = variant.name
        self.name = "ours"
        self.state = _build_stack(preset, variant, cfg)

    def make_step(self, objective: str, mode: str, long_len: int) -> Callable[[], None]:
        """A closure running one optimizer step of this objective/mode at `long_len` (batch built once)."""
        samples = synthetic_samples(objective, mode, long_len, self.cfg, self.preset.vocab_size)
        objective_config = _objective_config(objective, mode, self.variant)
        microbatches = _stack_microbatches(self.state, samples, objective_config)
        return lambda: _stack_train_step(self.state, microbatches, objective_config)

    def recover(self) -> None:
        """After a failed step: empty the gradient buffers and Megatron's global memory buffer (sized by the
        failed case) so nothing of it reaches the next case."""
        for chunk in self.state.chunks:
            chunk.zero_grad_buffer()
        self.state.optimizer.zero_grad()
        release_global_memory_buffer()

    def close(self) -> None:
        """Drops the model and Megatron's process-wide scratch buffers: the next variant starts clean."""
        self.state = None
        release_global_memory_buffer()
        free_memory(self.cfg.device)


@dataclasses.dataclass
class _StackState:
    chunks: list
    optimizer: Any
    parallel: Any
    collator: Any
    """training.batching.Collator: the step's pairs in one micro-batch, padded as the training run pads."""
    device: str
    steps_taken: int = 0


def _model_config(preset, variant: Variant, cfg: BenchConfig):
    return ModelConfig(preset=preset.name, attention_backend=variant.attention_backend, params_dtype=cfg.dtype,
                       fp8=variant.fp8, recompute=variant.recompute, init_seed=cfg.seed)


def _build_stack(preset, variant: Variant, cfg: BenchConfig) -> _StackState:
    """Model chunks (on the device), DDP and the Megatron optimizer, as the training run builds them.

    AdamW at lr 1e-6 and constant schedule: the weights move a little each step, like training,
    without the random-init model diverging over the benchmark's steps.
    """
    parallel = current_parallel_context()  # one process (commands.bench initialized it)
    model_config = _model_config(preset, variant, cfg)
    chunks = load_model(model_config, parallel, preset)  # random init, on the GPU if any
    chunks = wrap_ddp(chunks)
    optimizer = build_optimizer(chunks, lr=1e-6, weight_decay=0.0, clip_grad=1.0)
    # FP8 GEMMs need token counts in the recipe's multiple on each rank's shard: the one rule of training
    # and the reference pass (Collator.for_model: fp8_seq_multiple, applied per layout by collation)
    collator = Collator.for_model(model_config, parallel, "packed" if variant.packing else "padded",
                                  cfg.pairs_per_step, pad_token_id=0, vocab_size=None)
    return _StackState(chunks=chunks, optimizer=optimizer, parallel=parallel, collator=collator, device=cfg.device)


def _objective_config(objective: str, mode: str, variant: Variant):
    """The objective section a training run with this objective/mode would have (ra_gradient: solo only)."""
    solo_only = {"ra_gradient": variant.ra_gradient} if mode == "solo" else {}
    return ObjectiveConfig(name=objective, mode=mode, **solo_only)


def _stack_microbatches(state: _StackState, samples: list[dict], objective_config) -> list:
    """One micro-batch holding every pair of the step (cfg.pairs_per_step), already on the device."""
    microbatches = state.collator.microbatches(samples, objective_config)
    return [mb.to(state.device) for mb in microbatches]


def _stack_train_step(state: _StackState, microbatches: list, objective_config) -> None:
    """The one call into the training room: one optimizer step of our stack (training.step.train_step)."""
    train_step(state.chunks, state.optimizer, None, microbatches, objective_config, state.parallel, state.steps_taken)
    state.steps_taken += 1
