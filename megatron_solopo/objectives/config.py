"""`ObjectiveConfig` (the `objective:` section of an experiment) and the one dispatcher from a config's
mode to `preference_loss` / `solopo_loss` / `longpo_loss`.

The trainer asks this module which sequences need a forward pass (`required_sequences`,
`required_reference_sequences`), fills a mapping with their per-sequence statistics, and calls
`objective_loss(config, batch_stats, reduction="sum")`. Sequence names are "short_chosen",
"short_rejected", "long_chosen", "long_rejected"; the stats keys are "<sequence>_logps" (policy),
"ref_<sequence>_logps" (frozen reference) and "chosen_tokens" / "rejected_tokens" (response token
counts, identical for the short and long context because the response is the same).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from megatron_solopo.objectives.losses import (
    LONGPO_OBJECTIVE,
    NLL_WEIGHT,
    RA_DISTANCES,
    RA_GRADIENT,
    RA_ON,
    REDUCTIONS,
    SOLO_ALPHA,
    objective_hparam_specs,
    objectives_accepting,
    resolve_hparams,
    resolved_longpo_loss,
    resolved_preference_loss,
    resolved_solopo_loss,
)
from megatron_solopo.objectives.registry import SequenceStats, get_objective

__all__ = [
    "ObjectiveConfig",
    "MODES",
    "SEQUENCES",
    "required_sequences",
    "required_reference_sequences",
    "needs_reference",
    "required_batch_keys",
    "logps_key",
    "objective_loss",
    "sequence_stats",
]

SHORT_CHOSEN, SHORT_REJECTED = "short_chosen", "short_rejected"
LONG_CHOSEN, LONG_REJECTED = "long_chosen", "long_rejected"
SEQUENCES = (SHORT_CHOSEN, SHORT_REJECTED, LONG_CHOSEN, LONG_REJECTED)
PO_TERM_SEQUENCES = (SHORT_CHOSEN, SHORT_REJECTED)
"""The sequences solo mode's preference term L_PO(x_short; y_w, y_l) reads (the RA term adds the long ones)."""
TOKEN_KEYS = ("chosen_tokens", "rejected_tokens")

MODES = {
    "solo": "SoLoPO: base objective on (x_short; y_w, y_l) + alpha * SoLo-RA between x_short and x_long",
    "short": "base objective on (x_short; y_w, y_l) only: the short-context PO term of SoLoPO, no long pass",
    "long": "long-X baseline: base objective on (x_long; y_w, y_l), pairs sampled on x_long",
    "expand_long": "expand-long baseline: base objective on (x_long; y_w, y_l), pairs sampled on x_short",
    "longpo": "LongPO baseline: DPO, policy on x_long, reference on x_short, + nll_weight * NLL(y_w | x_long)",
}
_LEGACY_HPARAM_FIELDS = ("beta", "gamma", "lam", "label_smoothing")
"""Hyperparameters of the built-in objectives that may also be set as flat keys (objective.beta)."""
_SOLO_FIELDS = ("alpha", "ra_distance", "ra_on", "ra_gradient")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which preference objective to train with, in which mode, and its hyperparameters.

    The base objective's own hyperparameters are those its registry entry declares
    (`PreferenceObjective.hparams`), set under `hparams` (any registered objective) or, for the
    built-in ones, as the flat keys beta/gamma/lam/label_smoothing. A hyperparameter left out takes
    the objective's default. One that the chosen objective/mode does not use is an error naming the
    valid ones, never silently ignored. Everything is validated and resolved once, at construction:
    `resolved_hparams` holds the effective loss keyword arguments. Frozen: change it with
    `dataclasses.replace`, which validates again.
    """

    name: str = "orpo"
    """Base objective: "dpo", "ipo", "simpo", "orpo" or any registered one
    (`objectives.register_objective`). Default orpo: the paper's strongest SoLoPO variant on
    Qwen2.5-7B, and reference-free (no reference passes)."""
    mode: str = "solo"
    """How the objective is applied (which sequences are scored):
    "solo" SoLoPO; "short" short-context PO only; "long" long-X (pairs sampled on x_long, trained on
    x_long); "expand_long" (pairs sampled on x_short, trained on x_long, no SoLo-RA); "longpo" LongPO
    (name must be "dpo"). long and expand_long share the loss: the data decides which pairs are fed."""
    hparams: dict[str, float] = field(default_factory=dict)
    """The base objective's own hyperparameters by name, e.g. {beta: 0.05} for dpo or {margin: 0.3}
    for a registered objective declaring `margin`; each must be one the objective declares (see
    docs/objectives.md). Missing ones take the objective's defaults."""
    beta: float | None = None
    """Shorthand for hparams.beta: inverse temperature of the reward, dpo/ipo default 0.1, simpo default
    2.0 (not used by orpo)."""
    gamma: float | None = None
    """Shorthand for hparams.gamma: SimPO target margin (absolute), default 1.0. simpo only."""
    lam: float | None = None
    """Shorthand for hparams.lam: ORPO weight of the odds-ratio term (the ORPO paper's lambda), default
    0.1. orpo only."""
    label_smoothing: float | None = None
    """Shorthand for hparams.label_smoothing: conservative-DPO label flip probability in [0, 0.5),
    default 0.0. dpo, simpo and longpo only."""
    sft_weight: float | None = None
    """Weight of an extra length-averaged NLL of the (short) chosen response, default 0.0. Not in
    longpo mode, which has its own nll_weight."""
    alpha: float | None = None
    """Weight of the SoLo-RA term, default 1.0 (paper, Qwen2.5-7B: 3 for DPO, 1 for SimPO/ORPO;
    Llama3.1-8B ORPO: 4). solo mode only."""
    ra_distance: str | None = None
    """SoLo-RA distance s(d) on d = |r(x_short, y) - r(x_long, y)|: "abs" (default, s(d) = d) or
    "squared" (s(d) = d^2). solo mode only."""
    ra_on: str | None = None
    """Responses aligned by SoLo-RA: "chosen" (default; the paper's chosen-only form) or "both"
    (ablation; costs a fourth forward pass on (x_long, y_l)). solo mode only."""
    ra_gradient: str | None = None
    """Where the SoLo-RA term's gradient flows: "both" (default; the formula read literally, both
    rewards are differentiated, so the term can also lower r(x_short, y_w)) or "long" (r(x_short, y)
    is a fixed target: the term only moves the long-context reward; the short pair still trains
    through the PO term). The paper does not state which; see docs/objectives.md. solo mode only."""
    nll_weight: float | None = None
    """LongPO weight of the length-averaged NLL of y_w under x_long, default 0.01 (LongPO's
    public training script). longpo mode only."""

    def __post_init__(self) -> None:
        where = "objective"
        if self.mode not in MODES:
            raise ValueError(f"{where}.mode={self.mode!r} is not one of {sorted(MODES)}")
        get_objective(self.name)  # an unknown name lists the registered ones
        if self.mode == "longpo" and self.name != LONGPO_OBJECTIVE:
            raise ValueError(
                f"{where}.mode='longpo' is defined for DPO only (its reference model sees x_short); "
                f"set objective.name='{LONGPO_OBJECTIVE}' or choose another mode"
            )
        if not isinstance(self.hparams, Mapping):
            raise TypeError(f"{where}.hparams must be a mapping of hyperparameter name -> value, "
                            f"got {self.hparams!r}")
        object.__setattr__(self, "hparams", dict(self.hparams))  # a private copy: the config is frozen
        self._reject_unused("sft_weight", self.mode == "longpo", "longpo mode uses nll_weight instead")
        for key in _SOLO_FIELDS:
            self._reject_unused(key, self.mode != "solo", "it only applies to mode 'solo' (SoLoPO)")
        self._reject_unused("nll_weight", self.mode != "longpo", "it only applies to mode 'longpo'")
        object.__setattr__(self, "_resolved", self._resolve())

    def _reject_unused(self, key: str, unused: bool, why: str) -> None:
        if unused and getattr(self, key) is not None:
            raise ValueError(
                f"objective.{key}={getattr(self, key)!r} is not used with mode {self.mode!r}: {why}. Remove it."
            )

    def _given(self) -> dict[str, object]:
        """The base objective's hyperparameters as given (hparams + flat keys), each one it declares."""
        declared = get_objective(self.name).hparams
        given: dict[str, object] = {}
        for key, value in self.hparams.items():
            if not isinstance(key, str) or key not in declared:
                raise ValueError(
                    f"objective.hparams.{key}={value!r} is not a hyperparameter of {self.name!r} "
                    f"(used by: {objectives_accepting(key) if isinstance(key, str) else []}); {self.name!r} "
                    f"accepts {sorted(declared)}. Remove it or choose the objective it belongs to."
                )
            given[key] = value
        for key in _LEGACY_HPARAM_FIELDS:
            value = getattr(self, key)
            if value is None:
                continue
            if key not in declared:
                raise ValueError(
                    f"objective.{key}={value!r} is not a hyperparameter of {self.name!r} "
                    f"(it belongs to {objectives_accepting(key)}); {self.name!r} accepts "
                    f"{sorted(declared)}. Remove it."
                )
            if key in given:
                raise ValueError(f"objective.{key} and objective.hparams.{key} are both set; keep one of them")
            given[key] = value
        return given

    def _resolve(self) -> dict[str, object]:
        """The effective keyword arguments for this mode's loss function (defaults filled in, checked)."""
        where = f"objective (name={self.name!r}, mode={self.mode!r})"
        given = self._given()
        if self.mode == "longpo":
            resolved: dict[str, object] = dict(resolve_hparams(get_objective(LONGPO_OBJECTIVE).hparams, given, where))
            resolved["nll_weight"] = NLL_WEIGHT.check(
                "nll_weight", NLL_WEIGHT.default if self.nll_weight is None else self.nll_weight, where
            )
            return resolved
        if self.sft_weight is not None:
            given["sft_weight"] = self.sft_weight
        resolved = dict(resolve_hparams(objective_hparam_specs(self.name), given, where))
        if self.mode == "solo":
            alpha = SOLO_ALPHA.default if self.alpha is None else self.alpha
            resolved["alpha"] = SOLO_ALPHA.check("alpha", alpha, where)
            resolved["ra_distance"] = _choice(self.ra_distance, RA_DISTANCES, "ra_distance")
            resolved["ra_on"] = _choice(self.ra_on, RA_ON, "ra_on")
            resolved["ra_gradient"] = _choice(self.ra_gradient, RA_GRADIENT, "ra_gradient")
        return resolved

    @property
    def resolved_hparams(self) -> Mapping[str, object]:
        """The effective, validated keyword arguments of this mode's loss function (read-only view).

        Computed once when the config is built: the objective's hyperparameters with defaults filled
        in, plus sft_weight, and alpha/ra_distance/ra_on/ra_gradient (solo) or nll_weight (longpo).
        """
        return MappingProxyType(self._resolved)


def _choice(value: str | None, choices: tuple[str, ...], key: str) -> str:
    """None -> the first (default) choice; anything outside `choices` is an error."""
    if value is None:
        return choices[0]
    if value not in choices:
        raise ValueError(f"objective.{key}={value!r} is not one of {list(choices)}")
    return value


# ----------------------------------------------------------------------------------- sequences
def required_sequences(config: ObjectiveConfig) -> frozenset[str]:
    """Sequences the policy must run a forward (and backward) pass on, per preference pair."""
    if config.mode == "solo":
        both = config.resolved_hparams["ra_on"] == "both"
        return frozenset({SHORT_CHOSEN, SHORT_REJECTED, LONG_CHOSEN} | ({LONG_REJECTED} if both else set()))
    if config.mode == "short":
        return frozenset({SHORT_CHOSEN, SHORT_REJECTED})
    return frozenset({LONG_CHOSEN, LONG_REJECTED})  # long, expand_long, longpo


def required_reference_sequences(config: ObjectiveConfig) -> frozenset[str]:
    """Sequences the frozen reference model must score (empty for reference-free objectives)."""
    if config.mode == "longpo":
        return frozenset({SHORT_CHOSEN, SHORT_REJECTED})  # LongPO's short-to-long reference
    if not get_objective(config.name).needs_reference:
        return frozenset()
    return required_sequences(config)


def needs_reference(config: ObjectiveConfig) -> bool:
    """True if a reference model (or precomputed reference log-probs) is needed."""
    return bool(required_reference_sequences(config))


def logps_key(sequence: str, reference: bool = False) -> str:
    """The batch_stats key of a sequence's log-prob sums, e.g. "ref_long_chosen_logps"."""
    if sequence not in SEQUENCES:
        raise ValueError(f"unknown sequence {sequence!r}; sequences are {list(SEQUENCES)}")
    return f"ref_{sequence}_logps" if reference else f"{sequence}_logps"


def required_batch_keys(config: ObjectiveConfig) -> frozenset[str]:
    """Every key `objective_loss` reads from batch_stats for this config."""
    policy = {logps_key(seq) for seq in required_sequences(config)}
    reference = {logps_key(seq, reference=True) for seq in required_reference_sequences(config)}
    return frozenset(policy | reference | set(TOKEN_KEYS))


# ---------------------------------------------------------------------------------- dispatcher
LossResult = tuple[torch.Tensor, dict[str, object]]


def sequence_stats(batch_stats: Mapping[str, torch.Tensor], sequence: str,
                   reference_sequence: str | None = None) -> SequenceStats:
    """One sequence's `SequenceStats` from a batch_stats mapping: its policy log-prob sums, its response's
    token count and the reference sums of `reference_sequence` (default: the same sequence; LongPO's
    reference scores x_short), None when batch_stats holds none."""
    tokens = TOKEN_KEYS[0] if sequence.endswith("_chosen") else TOKEN_KEYS[1]
    reference = batch_stats.get(logps_key(reference_sequence or sequence, reference=True))
    return SequenceStats(batch_stats[logps_key(sequence)], batch_stats[tokens], reference)


def _solo(config: ObjectiveConfig, stats: Mapping[str, torch.Tensor], reduction: str) -> LossResult:
    long_rejected = sequence_stats(stats, LONG_REJECTED) if logps_key(LONG_REJECTED) in stats else None
    return resolved_solopo_loss(
        config.name,
        sequence_stats(stats, SHORT_CHOSEN),
        sequence_stats(stats, SHORT_REJECTED),
        sequence_stats(stats, LONG_CHOSEN),
        long_rejected,
        reduction=reduction,
        hparams=config.resolved_hparams,
    )


def _one_context(context: str) -> Callable[[ObjectiveConfig, Mapping[str, torch.Tensor], str], LossResult]:
    def loss(config: ObjectiveConfig, stats: Mapping[str, torch.Tensor], reduction: str) -> LossResult:
        return resolved_preference_loss(
            config.name,
            sequence_stats(stats, f"{context}_chosen"),
            sequence_stats(stats, f"{context}_rejected"),
            reduction=reduction,
            hparams=config.resolved_hparams,
        )

    return loss


def _longpo(config: ObjectiveConfig, stats: Mapping[str, torch.Tensor], reduction: str) -> LossResult:
    return resolved_longpo_loss(  # policy on x_long, reference on x_short
        sequence_stats(stats, LONG_CHOSEN, reference_sequence=SHORT_CHOSEN),
        sequence_stats(stats, LONG_REJECTED, reference_sequence=SHORT_REJECTED),
        reduction=reduction,
        hparams=config.resolved_hparams,
    )


_MODE_LOSSES: dict[str, Callable[[ObjectiveConfig, Mapping[str, torch.Tensor], str], LossResult]] = {
    "solo": _solo,
    "short": _one_context("short"),
    "long": _one_context("long"),
    "expand_long": _one_context("long"),
    "longpo": _longpo,
}


def objective_loss(
    config: ObjectiveConfig, batch_stats: Mapping[str, torch.Tensor], reduction: str = "sum"
) -> LossResult:
    """Loss and metrics of `config` on one micro-batch of per-sequence statistics.

    batch_stats must hold exactly the log-prob keys of `required_batch_keys(config)` (a missing one
    is an error; an extra "*_logps" key is too, since it means a wasted forward pass or the wrong
    mode) and "chosen_tokens" / "rejected_tokens". Other keys are not read. reduction="sum" (default)
    returns the batch sum for normalisation by a global pair count; see `preference_loss`.

    The hyperparameters are the config's `resolved_hparams` (validated once, when the config was
    built) and the tensors' values are not checked: no host sync, and NaN/Inf log-probs give a
    NaN/Inf loss instead of an error (the trainer checks the loss once per step). Call the public
    loss functions (`solopo_loss`, ...) for checked inputs.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"objective_loss: reduction={reduction!r} is not one of {list(REDUCTIONS)}")
    required = required_batch_keys(config)
    missing = sorted(required - set(batch_stats))
    unexpected = sorted(key for key in batch_stats if key.endswith("_logps") and key not in required)
    if missing or unexpected:
        raise ValueError(
            f"objective_loss(name={config.name!r}, mode={config.mode!r}): batch_stats is missing {missing} "
            f"and has unused {unexpected}; this objective needs exactly {sorted(required)} "
            f"(see required_sequences / required_reference_sequences)"
        )
    return _MODE_LOSSES[config.mode](config, batch_stats, reduction)
