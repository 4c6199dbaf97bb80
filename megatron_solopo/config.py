"""Experiment configuration: typed section dataclasses, YAML files and dotted command-line overrides.

Each room owns its section dataclass (``parallel.ParallelConfig``, ``model.ModelConfig``, ...); this
module composes them into `ExperimentConfig` and loads it; the conversions between YAML/dicts and
dataclasses are generic (`dataclass_yaml`). Unknown keys are errors that name the key and list the valid
ones, so a typo never becomes a silently ignored knob. It sits above every room whose section it composes.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping

from megatron_solopo.data.config import DataConfig
# re-exported: the generic half lives in dataclass_yaml; `config.load_section`, `config.to_dict`, ... stay public
from megatron_solopo.dataclass_yaml import (  # noqa: F401
    OVERRIDE_PATTERN,
    ConfigError,
    apply_overrides,
    from_dict,
    load_section,
    load_yaml,
    parse_override,
    save_config,
    to_dict,
)
from megatron_solopo.eval.config import EvalConfig
from megatron_solopo.model.config import ModelConfig
from megatron_solopo.objectives import ObjectiveConfig
from megatron_solopo.parallel.config import ParallelConfig
from megatron_solopo.training.config import TrainConfig


@dataclasses.dataclass
class ExperimentConfig:
    """A whole experiment: model, parallel layout, objective, data, train, eval (one YAML file).

    Each field is one room's section dataclass; `load_config` builds it from YAML and dotted overrides.
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Which architecture (preset) to build and how: dtype, attention backend, recompute (model/config.py)."""
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    """TP/PP/CP/DP layout, distributed backend and sequence parallelism (parallel/config.py)."""
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    """Preference objective, mode (SoLoPO, baselines) and its hyperparameters (objectives/config.py)."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """QA source, contexts, sampling, pairs and tokenization (data/config.py)."""
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """Optimizer, schedule, batch sizes, checkpoints and logging of the training run (training/config.py)."""
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    """Evaluation suites, generation settings and reports (eval/config.py)."""


def experiment_config_class() -> type[ExperimentConfig]:
    """The top-level config dataclass, one field per room section (kept for callers of the old API)."""
    return ExperimentConfig


def load_config(source: str | pathlib.Path | Mapping[str, Any] | None = None,
                overrides: list[str] | None = None) -> ExperimentConfig:
    """Loads an ExperimentConfig from a YAML file (or dict) and dotted overrides like `train.lr=1e-6`."""
    return load_section(ExperimentConfig, source, overrides)


