"""`QualityExperimentConfig`: one file that says which arms a quality experiment compares, on what.

    run_dir: runs/quality_135m
    shared:                       # an experiment config (model/data/train/eval), the same for every arm
      data: {source: synthetic, short_max_tokens: 512, long_target_tokens: [2048], ...}
      train: {steps: 40, global_batch_pairs: 4, lr: 5.0e-6, ...}
      eval: {suites: [multihop, short], context_lengths: [2048, 4096], depths: [0.0, 0.5, 1.0], ...}
    arms:
      - {name: solo-orpo, pairs: short, objective: {name: orpo, mode: solo, lam: 0.1, alpha: 1.0}}
      - {name: long-orpo, pairs: long, objective: {name: orpo, mode: long, lam: 0.1}}
      - {name: expand-long-orpo, pairs: short, objective: {name: orpo, mode: expand_long, lam: 0.1}}
    comparisons: [[long-orpo, solo-orpo], [expand-long-orpo, solo-orpo]]
    quick: [data.synthetic_num_items=4, train.steps=1, ...]

Every arm starts from the shared model, trains on the pair set it names (`short`: responses sampled on
x_short, the paper's SoLoPO and expand-long data; `long`: sampled on x_long, long-X) for the same steps
with the same hyperparameters; only its `objective` section differs. The untrained base model is
evaluated as the arm "base". Paired tests compare each `comparisons` entry [a, b] as b - a, and every
arm against the base.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any

from megatron_solopo.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    from_dict,
    load_config,
    load_yaml,
    parse_override,
)

__all__ = ["ArmConfig", "QualityExperimentConfig", "load_quality_config", "BASE_ARM", "PAIR_SETS"]

BASE_ARM = "base"
PAIR_SETS = ("short", "long")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_METRICS = ("sub_em", "em", "f1")


@dataclasses.dataclass
class ArmConfig:
    """One trained arm of the experiment."""

    name: str
    """Label in tables and plots, and the arm's directory name (letters, digits, '.', '-', '_')."""
    objective: dict[str, Any]
    """The arm's `objective` section (replaces the shared one): e.g. {name: orpo, mode: solo, lam: 0.1}."""
    pairs: str = "short"
    """Which pair set the arm trains on: short (responses sampled on x_short) | long (sampled on x_long)."""
    ablation: str | None = None
    """A label that marks the arm as an ablation in tables (e.g. "scripted responses"); None for a main arm."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or self.name == BASE_ARM:
            raise ValueError(f"arm name {self.name!r} must be letters/digits/'.-_' and not {BASE_ARM!r}")
        if self.pairs not in PAIR_SETS:
            raise ValueError(f"arm {self.name}: pairs={self.pairs!r} is not one of {PAIR_SETS}")
        if not self.objective:
            raise ValueError(f"arm {self.name}: objective must name at least the objective (name, mode)")


@dataclasses.dataclass
class QualityExperimentConfig:
    """A quality experiment: shared settings, the arms, the comparisons and the statistics."""

    shared: dict[str, Any]
    """An experiment config (sections model, parallel, data, train, eval) used by every stage; validated
    as an ExperimentConfig when the file is loaded."""
    arms: list[ArmConfig]
    """The trained arms; the untrained base model is always evaluated too (arm "base")."""
    run_dir: str = "runs/quality"
    """Where every stage writes (data/, train/<arm>/, eval/<arm>/, results/, stages/); --run-dir overrides."""
    comparisons: list[list[str]] = dataclasses.field(default_factory=list)
    """Pairs [a, b] of arm names tested as b - a on the same eval items (each arm vs base is added)."""
    metric: str = "sub_em"
    """The per-item score the table and tests use: sub_em | em | f1 (McNemar needs 0/1: sub_em or em)."""
    bootstrap_resamples: int = 10_000
    """Resamples for the bootstrap CIs and the paired bootstrap."""
    seed: int = 0
    """Seed of the bootstrap resampling."""
    quick: list[str] = dataclasses.field(default_factory=list)
    """Dotted overrides of `shared` applied with --quick (tiny sizes: checks that every stage connects);
    `section.key=null` removes a key of `shared` (its default applies)."""

    def __post_init__(self) -> None:
        names = [arm.name for arm in self.arms]
        if not names:
            raise ValueError("the experiment needs at least one arm")
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        known = {BASE_ARM, *names}
        for pair in self.comparisons:
            if len(pair) != 2 or not set(pair) <= known or pair[0] == pair[1]:
                raise ValueError(f"comparison {pair} must be two different arms among {sorted(known)}")
        if self.metric not in _METRICS:
            raise ValueError(f"metric={self.metric!r} is not one of {_METRICS}")
        if self.bootstrap_resamples < 100:
            raise ValueError(f"bootstrap_resamples={self.bootstrap_resamples} is too few for a 95% CI (use >= 1000)")

    def pair_sets(self) -> list[str]:
        """The pair sets some arm trains on, in PAIR_SETS order."""
        return [name for name in PAIR_SETS if any(arm.pairs == name for arm in self.arms)]

    def all_comparisons(self) -> list[tuple[str, str]]:
        """The configured comparisons, then every arm against the base, without repeats."""
        pairs = [tuple(pair) for pair in self.comparisons]
        pairs += [(BASE_ARM, arm.name) for arm in self.arms]
        return list(dict.fromkeys(pairs))

    def shared_config(self, overrides: list[str] | None = None) -> ExperimentConfig:
        """The shared ExperimentConfig with dotted overrides applied; `key=null` removes the key (back to
        its default: e.g. sampling knobs that the scripted backend of --quick would reject as unused)."""
        data = _deep_copy(self.shared)
        sets = []
        for text in overrides or []:
            path, value = parse_override(text)
            if value is None:
                _remove(data, path)
            else:
                sets.append(text)
        return load_config(apply_overrides(data, sets))


def _remove(data: dict, path: list[str]) -> None:
    node = data
    for part in path[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            return
    node.pop(path[-1], None)


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {key: _deep_copy(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_deep_copy(value) for value in data]
    return data


def load_quality_config(path: str | pathlib.Path) -> QualityExperimentConfig:
    """Reads and validates an experiment file (arms, comparisons, and the shared config as an
    ExperimentConfig, with and without the quick overrides)."""
    data = load_yaml(path)
    config = from_dict(QualityExperimentConfig, data, where="")
    try:
        config.shared_config()
        config.shared_config(config.quick)
        for arm in config.arms:
            load_config({**_deep_copy(config.shared), "objective": arm.objective})
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    return config
