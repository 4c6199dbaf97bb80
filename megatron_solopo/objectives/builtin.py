"""The four base objectives of the SoLoPO paper's experiments (DPO, SimPO, ORPO) plus IPO.

Notation (per pair, all tensors [B]): logp_w / logp_l are the policy's response log-prob sums for the
chosen y_w / rejected y_l, ref_w / ref_l the reference model's, |y| the response token count and
a(y|x) = logp(y|x) / |y| the length-averaged log-prob. Formulas are in docs/objectives.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from megatron_solopo.objectives.registry import HParam, PreferenceObjective, SequenceStats, register_objective

__all__ = ["DPO", "IPO", "SIMPO", "ORPO", "orpo_log_odds", "orpo_clamp_eps", "ORPO_MIN_CLAMP_EPS"]

_LN_HALF = -math.log(2.0)
# ORPO's log-odds needs a < 0 strictly; 1e-6 keeps d(log_odds)/da = 1/(1 - e^a) <= ~1e6 (finite in
# fp32) while leaving every realistic average log-prob (a per-token probability below 0.999999) intact.
ORPO_MIN_CLAMP_EPS = 1e-6


def _beta(doc_default: float) -> HParam:
    return HParam(doc_default, "inverse temperature of the implicit reward", low=0.0, low_open=True)


_LABEL_SMOOTHING = HParam(
    0.0, "probability that a preference label is flipped (conservative DPO)", low=0.0, high=0.5, high_open=True
)


def _smoothed_logistic_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1-eps) log sigmoid(logits) - eps log sigmoid(-logits), [B]; logsigmoid keeps |logits| ~ 1e4 finite."""
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


# ----------------------------------------------------------------------------------------------- DPO
def _dpo_pair_loss(
    chosen: SequenceStats, rejected: SequenceStats, hp: Mapping[str, float]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    z = (chosen.logps - chosen.require_ref("dpo")) - (rejected.logps - rejected.require_ref("dpo"))
    return _smoothed_logistic_loss(hp["beta"] * z, hp["label_smoothing"]), {}


def _log_ratio_reward(seq: SequenceStats, hp: Mapping[str, float]) -> torch.Tensor:
    """r(x, y) = beta * (logp(y|x) - ref(y|x)), DPO's implicit reward (also reported for IPO)."""
    return hp["beta"] * (seq.logps - seq.require_ref("dpo/ipo"))


DPO = register_objective(
    PreferenceObjective(
        name="dpo",
        pair_loss=_dpo_pair_loss,
        reward=_log_ratio_reward,
        needs_reference=True,
        hparams={"beta": _beta(0.1), "label_smoothing": _LABEL_SMOOTHING},
        summary="-(1-eps) logsig(beta z) - eps logsig(-beta z), z = (logp_w - ref_w) - (logp_l - ref_l)",
    )
)


# ----------------------------------------------------------------------------------------------- IPO
def _ipo_pair_loss(
    chosen: SequenceStats, rejected: SequenceStats, hp: Mapping[str, float]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    # Length-averaged log-ratios (as TRL and the IPO authors do) so 1/(2 beta) does not scale with |y|.
    chosen_ratio = (chosen.logps - chosen.require_ref("ipo")) / chosen.tokens
    rejected_ratio = (rejected.logps - rejected.require_ref("ipo")) / rejected.tokens
    return (chosen_ratio - rejected_ratio - 1.0 / (2.0 * hp["beta"])) ** 2, {}


IPO = register_objective(
    PreferenceObjective(
        name="ipo",
        pair_loss=_ipo_pair_loss,
        reward=_log_ratio_reward,
        needs_reference=True,
        hparams={
            "beta": HParam(0.1, "IPO regularisation tau; the target margin is 1/(2 beta)", low=0.0, low_open=True)
        },
        summary="(z' - 1/(2 beta))^2, z' = (logp_w - ref_w)/|y_w| - (logp_l - ref_l)/|y_l|",
    )
)


# --------------------------------------------------------------------------------------------- SimPO
def _simpo_pair_loss(
    chosen: SequenceStats, rejected: SequenceStats, hp: Mapping[str, float]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits = hp["beta"] * (chosen.mean_logps - rejected.mean_logps) - hp["gamma"]
    return _smoothed_logistic_loss(logits, hp["label_smoothing"]), {}


def _simpo_reward(seq: SequenceStats, hp: Mapping[str, float]) -> torch.Tensor:
    """r(x, y) = beta * logp(y|x) / |y|."""
    return hp["beta"] * seq.mean_logps


SIMPO = register_objective(
    PreferenceObjective(
        name="simpo",
        pair_loss=_simpo_pair_loss,
        reward=_simpo_reward,
        needs_reference=False,
        hparams={
            "beta": _beta(2.0),
            "gamma": HParam(1.0, "target reward margin (absolute, not divided by beta)"),
            "label_smoothing": _LABEL_SMOOTHING,
        },
        summary="-logsig(beta a_w - beta a_l - gamma), a = logp/|y|",
    )
)


# ---------------------------------------------------------------------------------------------- ORPO
def orpo_clamp_eps(dtype: torch.dtype) -> float:
    """The margin below 0 to which ORPO clamps a = logp/|y|: 1e-6, or the dtype's epsilon if coarser."""
    return max(ORPO_MIN_CLAMP_EPS, torch.finfo(dtype).eps)


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0 without cancellation (Maechler 2012: switch at a = -ln 2)."""
    # Both branches are finite for every a <= -eps, so torch.where leaks no NaN into the gradient.
    return torch.where(a > _LN_HALF, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def orpo_log_odds(mean_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO's log odds log(p / (1 - p)) of p = exp(a), with a clamped to <= -eps.

    Returns (log_odds [B], clamped [B] bool). A clamped entry has zero gradient through the log odds
    (the NLL term of ORPO still pulls it); the count is reported as metric "orpo/clamped".
    """
    eps = orpo_clamp_eps(mean_logps.dtype)
    clamped = mean_logps > -eps
    a = mean_logps.clamp(max=-eps)
    return a - _log1mexp(a), clamped


def _orpo_pair_loss(
    chosen: SequenceStats, rejected: SequenceStats, hp: Mapping[str, float]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    chosen_log_odds, _ = orpo_log_odds(chosen.mean_logps)
    rejected_log_odds, _ = orpo_log_odds(rejected.mean_logps)
    nll = -chosen.mean_logps
    odds_ratio = -hp["lam"] * F.logsigmoid(chosen_log_odds - rejected_log_odds)
    return nll + odds_ratio, {"loss/orpo_nll": nll, "loss/orpo_or": odds_ratio}


def _orpo_reward(seq: SequenceStats, hp: Mapping[str, float]) -> torch.Tensor:
    """r(x, y) = log(p / (1 - p)), p = exp(logp(y|x) / |y|)."""
    return orpo_log_odds(seq.mean_logps)[0]


def _orpo_counters(seq: SequenceStats, hp: Mapping[str, float]) -> dict[str, torch.Tensor]:
    return {"orpo/clamped": orpo_log_odds(seq.mean_logps.detach())[1].to(seq.logps.dtype)}


ORPO = register_objective(
    PreferenceObjective(
        name="orpo",
        pair_loss=_orpo_pair_loss,
        reward=_orpo_reward,
        needs_reference=False,
        hparams={"lam": HParam(0.1, "weight of the odds-ratio term (ORPO's lambda)", low=0.0)},
        counters=_orpo_counters,
        summary="-a_w - lam logsig(log_odds_w - log_odds_l), log_odds = a - log(1 - e^a)",
    )
)
