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
    validation: [eval.seed=101]     # the split alpha candidates are chosen on (arms with alpha_candidates)
    preregistration: {primary_suite: ..., primary_comparisons: [[long-orpo, solo-orpo]], items_per_cell: ...}

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
from megatron_solopo.eval.stats import mcnemar_items_needed

__all__ = ["ArmConfig", "Preregistration", "QualityExperimentConfig", "load_quality_config", "BASE_ARM",
           "PAIR_SETS", "MAX_ALPHA_CANDIDATES"]

BASE_ARM = "base"
PAIR_SETS = ("short", "long")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_METRICS = ("sub_em", "em", "f1")
_BINARY_METRICS = ("sub_em", "em")
MAX_ALPHA_CANDIDATES = 3


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
    alpha_candidates: list[float] = dataclasses.field(default_factory=list)
    """SoLoPO arms only: up to three values of objective.alpha. One arm is trained per value, each is
    evaluated on the validation split (the experiment's `validation` overrides of the eval section), and
    the best on the selection cell becomes the arm (ties: the first value listed). Empty: the objective's
    alpha, no selection."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or self.name == BASE_ARM:
            raise ValueError(f"arm name {self.name!r} must be letters/digits/'.-_' and not {BASE_ARM!r}")
        if self.pairs not in PAIR_SETS:
            raise ValueError(f"arm {self.name}: pairs={self.pairs!r} is not one of {PAIR_SETS}")
        if not self.objective:
            raise ValueError(f"arm {self.name}: objective must name at least the objective (name, mode)")
        self._check_alpha_candidates()

    def _check_alpha_candidates(self) -> None:
        values = self.alpha_candidates
        if not values:
            return
        where = f"arm {self.name}: alpha_candidates={values}"
        if self.objective.get("mode", "solo") != "solo":
            raise ValueError(f"{where}: only a SoLoPO arm (objective.mode: solo) has an alpha to select")
        if "alpha" in self.objective:
            raise ValueError(f"{where}: the candidates set objective.alpha; remove objective.alpha={self.objective['alpha']}")
        if not 2 <= len(values) <= MAX_ALPHA_CANDIDATES or len(set(values)) != len(values):
            raise ValueError(f"{where}: give 2 to {MAX_ALPHA_CANDIDATES} distinct values (one value needs no selection: "
                             "set objective.alpha instead)")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in values):
            raise ValueError(f"{where}: every candidate must be a number >= 0")

    def candidate_name(self, alpha: float) -> str:
        """The directory/stage name of the candidate trained with `alpha`, e.g. solo-orpo.alpha-0.3."""
        return f"{self.name}.alpha-{alpha:g}"

    def candidate_objective(self, alpha: float) -> dict[str, Any]:
        """The objective section of the candidate trained with `alpha`."""
        return {**self.objective, "alpha": alpha}


@dataclasses.dataclass
class Preregistration:
    """What the experiment will decide and how, fixed (and committed) before any arm is evaluated.

    Checked when the file is loaded: the items per cell must reach the power calculation (exact paired
    McNemar, `eval.stats.mcnemar_items_needed`) at the pilot's discordance, the eval must ask that many
    questions in the primary cell, and the comparisons must name arms of the file.
    """

    primary_suite: str
    """The eval suite of the primary cell (a long-context suite, e.g. ruler_niah_multikey)."""
    primary_context_length: int
    """The primary cell's context length in tokens (one of eval.context_lengths)."""
    primary_depth: float
    """The primary cell's evidence depth (one of eval.depths; 0.5 = mid context)."""
    primary_comparisons: list[list[str]]
    """Pairs [a, b] tested as b - a on the primary cell (e.g. [long-orpo, solo-orpo-long])."""
    pilot_discordance: float
    """Share of items right for exactly one of two paired conditions, as measured in the pilot (the
    input of the power calculation)."""
    pilot: str
    """Where the discordance was measured (a results folder of the repository)."""
    items_per_cell: int
    """Questions per eval cell; must be >= the power calculation's number."""
    detect_points: float = 10.0
    """The difference (accuracy points) the primary comparisons must detect with `power`."""
    power: float = 0.8
    """Probability of detecting a true difference of `detect_points`."""
    level: float = 0.05
    """Two-sided significance level of the primary tests (no correction across them: listed as such)."""
    short_suite: str = "short"
    """The short-context suite on which no SoLoPO arm may lose more than `short_margin_points` vs base."""
    short_margin_points: float = 5.0
    """Largest accepted loss (point estimate, accuracy points) of a SoLoPO arm vs base on `short_suite`."""

    def __post_init__(self) -> None:
        if not 0 < self.detect_points <= 100 or not 0 < self.power < 1 or not 0 < self.level < 1:
            raise ValueError("need 0 < detect_points <= 100, 0 < power < 1 and 0 < level < 1")
        if not self.detect_points / 100 <= self.pilot_discordance <= 1:
            raise ValueError(f"pilot_discordance={self.pilot_discordance} must be in "
                             f"[detect_points/100, 1] (only discordant items can differ)")
        needed = mcnemar_items_needed(self.detect_points / 100, self.pilot_discordance, self.level, self.power)
        if self.items_per_cell < needed:
            raise ValueError(f"items_per_cell={self.items_per_cell} is below the power calculation: "
                             f"{needed} paired items detect {self.detect_points:g} points with power "
                             f"{self.power:g} at level {self.level:g} and discordance {self.pilot_discordance:g}")
        if not self.primary_comparisons:
            raise ValueError("primary_comparisons must name at least one pair of arms")

    def items_needed(self) -> int:
        """The power calculation's number of paired items per cell."""
        return mcnemar_items_needed(self.detect_points / 100, self.pilot_discordance, self.level, self.power)


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
    validation: list[str] = dataclasses.field(default_factory=list)
    """Dotted overrides of the eval section (`eval.*` only) that make the validation split on which
    alpha candidates are chosen: at least another eval.seed (the test questions stay unseen; the analysis
    checks that no validation question is a test question). Needed when an arm has alpha_candidates."""
    preregistration: Preregistration | None = None
    """The pre-registered decision (primary cell, comparisons, power); None for an exploratory run."""

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
        self._check_validation()
        if self.preregistration is not None:
            self._check_preregistration(self.preregistration, known)

    def _check_validation(self) -> None:
        bad = [text for text in self.validation if not text.startswith("eval.")]
        if bad:
            raise ValueError(f"validation overrides must set eval.* keys only, got {bad}")
        selecting = [arm.name for arm in self.arms if arm.alpha_candidates]
        if selecting and not any(text.startswith("eval.seed=") for text in self.validation):
            raise ValueError(f"arms {selecting} select alpha on a validation split: set `validation` with at "
                             "least another eval.seed (e.g. [eval.seed=101]), so test questions stay unseen")

    def _check_preregistration(self, prereg: Preregistration, known: set[str]) -> None:
        for pair in prereg.primary_comparisons:
            if len(pair) != 2 or not set(pair) <= known or pair[0] == pair[1]:
                raise ValueError(f"preregistration: comparison {pair} must be two different arms among {sorted(known)}")
        if self.metric not in _BINARY_METRICS:
            raise ValueError(f"preregistration: the McNemar test needs a 0/1 metric ({_BINARY_METRICS}), got {self.metric}")

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
        shared = config.shared_config()
        config.shared_config(config.quick)
        config.shared_config(config.validation)
        if config.preregistration is not None:
            _check_primary_cell(config.preregistration, shared.eval)
        for arm in config.arms:
            load_config({**_deep_copy(config.shared), "objective": arm.objective})
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    return config


def _check_primary_cell(prereg: Preregistration, eval_config: Any) -> None:
    """The shared eval asks the primary cell, with at least the pre-registered number of questions."""
    where = "preregistration"
    if prereg.primary_suite not in eval_config.suites or prereg.short_suite not in eval_config.suites:
        raise ConfigError(f"{where}: primary_suite={prereg.primary_suite!r} and short_suite={prereg.short_suite!r} "
                          f"must both be in shared.eval.suites={list(eval_config.suites)}")
    if prereg.primary_context_length not in eval_config.context_lengths or prereg.primary_depth not in eval_config.depths:
        raise ConfigError(f"{where}: the primary cell ({prereg.primary_context_length} tokens, depth "
                          f"{prereg.primary_depth}) is not asked by shared.eval (context_lengths "
                          f"{list(eval_config.context_lengths)}, depths {list(eval_config.depths)})")
    if eval_config.num_samples < prereg.items_per_cell:
        raise ConfigError(f"{where}: shared.eval.num_samples={eval_config.num_samples} asks fewer questions per cell "
                          f"than items_per_cell={prereg.items_per_cell}")
