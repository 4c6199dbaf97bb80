"""The divergence guard: a run stops with `TrainingDiverged` before a diverged model can be saved.

A NaN/Inf loss or gradient (training/step.py raises it before the optimizer step), or an update that
makes the parameters non-finite or grows their L2 norm by more than train.max_param_norm_growth in
one step, stops the run without saving. The error names the step, the pairs of that step, the last
good checkpoint and the command that continues it with a lower lr (schedule settings may change on
resume). The guard runs after every optimizer step and before any checkpoint is written, so no
checkpoint ever holds a diverged model.
"""

from __future__ import annotations

import math
import pathlib

import torch
import torch.distributed as dist

from megatron_solopo.training.config import TrainConfig
from megatron_solopo.training.logging import MetricsLogger

__all__ = ["DivergenceGuard", "TrainingDiverged", "parameter_norm", "recovery_hint"]


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN/Inf; nothing was saved for that step."""


def parameter_norm(chunks: list) -> float:
    """Global L2 norm of the model's parameters (every rank's local shards; replicas counted once per rank,
    which does not matter for the growth ratio the divergence guard uses). Collective."""
    squares = torch.zeros((), dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    for chunk in chunks:
        for param in chunk.parameters():
            squares += param.detach().double().pow(2).sum().to(squares.device)
    dist.all_reduce(squares)
    return float(squares.sqrt().item())


def recovery_hint(train: TrainConfig, checkpoint: str | None) -> str:
    """Where to go back to after a divergence: the last good checkpoint and the command continuing it."""
    config_file = pathlib.Path(train.output_dir) / "config.yaml"
    lower = f"{min(train.lr / 10, 1e-4):.3g}"  # a tenth of this run's lr, at most 1e-4
    if checkpoint is None:
        return (f"no checkpoint was saved yet; start again with a lower learning rate: solopo train --config "
                f"{config_file} train.lr={lower}")
    return (f"the last good checkpoint is {checkpoint}; continue from it with a lower learning rate: "
            f"solopo train --config {config_file} train.resume={checkpoint} train.lr={lower}")


class DivergenceGuard:
    """Checks every step of one run; the failure is logged to metrics.jsonl (not the console) and raised.

    Construction measures the starting parameter norm (collective, like every check).
    """

    def __init__(self, train: TrainConfig, chunks: list, metrics_logger: MetricsLogger):
        self.train, self.chunks, self.metrics_logger = train, chunks, metrics_logger
        self.norm = parameter_norm(chunks)
        """The parameters' L2 norm after the last step that passed."""

    def step_failed(self, step: int, err: FloatingPointError, checkpoint: str | None) -> TrainingDiverged:
        """The error to raise for a step whose loss or gradients were NaN/Inf (err: train_step's
        NonFiniteLossError or NonFiniteGradError, which name the step's pairs)."""
        self.metrics_logger.log(step, {"error": str(err), "sample_ids": list(err.sample_ids)}, console=False)
        return TrainingDiverged(f"{err} Nothing was saved for this step; {recovery_hint(self.train, checkpoint)}")

    def check_update(self, step: int, sample_ids: list[str], checkpoint: str | None) -> None:
        """TrainingDiverged when the step's update made the weights non-finite or exploded their norm."""
        before, after = self.norm, parameter_norm(self.chunks)
        limit = self.train.max_param_norm_growth
        finite = math.isfinite(after)
        if finite and not (limit and before > 0 and after > limit * before):
            self.norm = after
            return
        what = ("made the parameters non-finite" if not finite else
                f"grew the parameter L2 norm from {before:.4g} to {after:.4g} (more than "
                f"train.max_param_norm_growth = {limit:g} times)")
        err = TrainingDiverged(f"step {step}: the optimizer update {what}; samples of this step: {sample_ids}. The "
                               f"model diverged (learning rate too high?). Nothing was saved for this step; "
                               f"{recovery_hint(self.train, checkpoint)}")
        self.metrics_logger.log(step, {"error": str(err), "sample_ids": sample_ids, "param_norm": after},
                                console=False)
        raise err
