"""Registry of base preference objectives (DPO, IPO, SimPO, ORPO, and user plug-ins).

A base objective is defined once, as data: its per-pair loss, its implicit reward r(x, y), whether it
needs reference-model log-probs, and the hyperparameters it accepts (with defaults and bounds). The
public loss functions (`preference_loss`, `solopo_loss`) and `ObjectiveConfig` look objectives up
here by name, so a new objective plugs in everywhere by calling `register_objective` once.

Everything operates on per-sequence statistics (`SequenceStats`): the sum of the response-token
log-probs, the response token count, and optionally the frozen reference model's sum. No reduction
over the batch happens in an objective: every tensor it returns is per pair, shape [B].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

__all__ = [
    "HParam",
    "SequenceStats",
    "PreferenceObjective",
    "register_objective",
    "unregister_objective",
    "get_objective",
    "registered_objectives",
]


@dataclass(frozen=True)
class SequenceStats:
    """Per-sequence statistics of one (context, response) sequence for a batch of B pairs.

    logps: [B] sum over response tokens of log pi_theta(y_t | x, y_<t) (the policy).
    tokens: [B] number of response tokens |y| (> 0), same dtype as logps.
    ref_logps: [B] the same sum under the frozen reference model, or None for reference-free objectives.
    """

    logps: torch.Tensor
    tokens: torch.Tensor
    ref_logps: torch.Tensor | None = None

    @property
    def mean_logps(self) -> torch.Tensor:
        """a(y|x) = logp(y|x) / |y|, the length-averaged log-prob, [B]."""
        return self.logps / self.tokens

    def require_ref(self, objective: str) -> torch.Tensor:
        """The reference log-probs; raises if absent (a registered objective's bug, not a user error)."""
        if self.ref_logps is None:
            raise ValueError(f"objective {objective!r} needs reference log-probs but got none")
        return self.ref_logps


@dataclass(frozen=True)
class HParam:
    """One scalar hyperparameter an objective accepts.

    default: value used when the caller does not pass it.
    doc: one line for docs and error messages.
    low, high: allowed interval; `low_open`/`high_open` make an end exclusive.
    """

    default: float
    doc: str
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def describe_range(self) -> str:
        """The allowed interval in interval notation, e.g. '(0, inf)'."""
        left = "(" if self.low_open or math.isinf(self.low) else "["
        right = ")" if self.high_open or math.isinf(self.high) else "]"
        return f"{left}{self.low:g}, {self.high:g}{right}"

    def check(self, name: str, value: object, where: str) -> float:
        """Return `value` as a float, or raise TypeError/ValueError saying what is wrong and how to fix it."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"{where}: hyperparameter {name!r} must be a real number, got {type(value).__name__} "
                f"{value!r} (a YAML value like 1e-6 needs a dot, 1.0e-6, to parse as a float)"
            )
        number = float(value)
        too_low = number <= self.low if self.low_open else number < self.low
        too_high = number >= self.high if self.high_open else number > self.high
        if not math.isfinite(number) or too_low or too_high:
            raise ValueError(
                f"{where}: hyperparameter {name}={value!r} is outside its allowed range "
                f"{self.describe_range()} ({self.doc})"
            )
        return number


RESERVED_HPARAM_NAMES = frozenset({"sft_weight", "alpha", "ra_distance", "ra_on", "ra_gradient", "nll_weight", "reduction", "name"})
"""Keyword names the loss functions and `ObjectiveConfig` use themselves; no objective may declare them."""

# loss(chosen, rejected, hparams) -> (per-pair loss [B], extra loss components name -> [B])
PairLossFn = Callable[[SequenceStats, SequenceStats, Mapping[str, float]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
# reward(seq, hparams) -> implicit reward r(x, y), [B], differentiable (SoLo-RA backpropagates through it)
RewardFn = Callable[[SequenceStats, Mapping[str, float]], torch.Tensor]
# counters(seq, hparams) -> name -> [B] event counts per pair (e.g. numerical clamps), summed when reported
CountersFn = Callable[[SequenceStats, Mapping[str, float]], dict[str, torch.Tensor]]


def _no_counters(seq: SequenceStats, hparams: Mapping[str, float]) -> dict[str, torch.Tensor]:
    return {}


@dataclass(frozen=True)
class PreferenceObjective:
    """A base preference-optimization objective, registered once by name.

    name: registry key, lower case (e.g. "dpo").
    pair_loss: per-pair loss on (chosen, rejected) under one context; returns ([B] loss, components).
        Component names start with "loss/" and are parts of the loss already included in it.
    reward: the implicit reward r(x, y) of one sequence, [B]; SoLo-RA penalises its short-to-long gap.
    needs_reference: True if pair_loss/reward read `SequenceStats.ref_logps` (then every sequence
        passed to them carries reference log-probs; if False, passing any is an error).
    hparams: name -> HParam for every hyperparameter pair_loss/reward read (others are rejected). They
        are the objective's own config keys: `objective: {name: <name>, hparams: {<key>: value}}` in
        YAML, validated once when the config is built (no other file needs to know them).
    counters: optional per-pair event counts to report (summed over the batch, e.g. clamps).
    summary: one-line formula for docs and errors.
    """

    name: str
    pair_loss: PairLossFn
    reward: RewardFn
    needs_reference: bool
    hparams: Mapping[str, HParam] = field(default_factory=dict)
    counters: CountersFn = _no_counters
    summary: str = ""

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.lower() or not self.name.replace("_", "").isalnum():
            raise ValueError(f"objective name {self.name!r} must be a non-empty lower-case identifier")
        if not callable(self.pair_loss) or not callable(self.reward) or not callable(self.counters):
            raise TypeError(f"objective {self.name!r}: pair_loss, reward and counters must be callables")
        for key, spec in self.hparams.items():
            if not isinstance(key, str) or not key.isidentifier() or key in RESERVED_HPARAM_NAMES:
                raise ValueError(f"objective {self.name!r}: hyperparameter name {key!r} must be an identifier "
                                 f"other than {sorted(RESERVED_HPARAM_NAMES)} (those are set by the mode)")
            if not isinstance(spec, HParam):
                raise TypeError(f"objective {self.name!r}: hparams[{key!r}] must be an HParam, got {spec!r}")


_REGISTRY: dict[str, PreferenceObjective] = {}


def register_objective(objective: PreferenceObjective, *, replace: bool = False) -> PreferenceObjective:
    """Add `objective` to the registry (returns it, so it can be used as a module-level definition).

    Raises ValueError if the name is taken, unless replace=True.
    """
    if not isinstance(objective, PreferenceObjective):
        raise TypeError(f"register_objective expects a PreferenceObjective, got {type(objective).__name__}")
    if objective.name in _REGISTRY and not replace:
        raise ValueError(
            f"objective {objective.name!r} is already registered; pick another name or pass replace=True"
        )
    _REGISTRY[objective.name] = objective
    return objective


def unregister_objective(name: str) -> PreferenceObjective:
    """Remove and return a registered objective (for tests and plug-in reloads)."""
    if name not in _REGISTRY:
        raise ValueError(f"no objective named {name!r} is registered; registered: {registered_objectives()}")
    return _REGISTRY.pop(name)


def get_objective(name: str) -> PreferenceObjective:
    """The registered objective called `name`; ValueError listing the registered names otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(
            f"unknown preference objective {name!r}; registered objectives are {registered_objectives()} "
            f"(add one with megatron_solopo.objectives.register_objective)"
        )
    return _REGISTRY[name]


def registered_objectives() -> tuple[str, ...]:
    """Names of all registered objectives, sorted."""
    return tuple(sorted(_REGISTRY))
