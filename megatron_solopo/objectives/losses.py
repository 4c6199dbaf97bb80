"""Public loss functions: `preference_loss`, `solopo_loss` (the SoLoPO objective) and `longpo_loss`.

All three are pure functions of per-sequence statistics, each a tensor of shape [B] (one value per
preference pair): response log-prob sums of the policy (and, for DPO/IPO, of the frozen reference)
and the response token counts. They return `(loss, metrics)`:

- reduction="mean": loss is the batch mean (scalar); metrics are python floats (batch means, except
  count metrics such as "orpo/clamped", which are batch totals).
- reduction="sum": loss is the batch sum (scalar), for a trainer that normalises by a global pair
  count; metrics are detached 0-dim tensors holding batch sums (no host sync, ready to all-reduce).
- reduction="none": loss is [B]; every metric is a detached [B] tensor.

Metric names: rewards/chosen, rewards/rejected, rewards/margin (chosen - rejected), rewards/accuracy
(1 where chosen reward > rejected reward), loss/po (the base objective), loss/sft (if sft_weight > 0),
loss/ra, ra/distance, rewards/long_chosen (SoLoPO), ra/distance_rejected and rewards/long_rejected
(SoLoPO with ra_on="both"), loss/nll (LongPO), loss/orpo_nll and loss/orpo_or (ORPO's two parts of
loss/po) and orpo/clamped (number of ORPO log-odds inputs clamped below 0). The loss is the sum of
loss/po, loss/sft, loss/ra and loss/nll.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from megatron_solopo.objectives.registry import (
    HParam,
    PreferenceObjective,
    SequenceStats,
    get_objective,
    registered_objectives,
)

__all__ = [
    "preference_loss",
    "solopo_loss",
    "longpo_loss",
    "resolved_preference_loss",
    "resolved_solopo_loss",
    "resolved_longpo_loss",
    "objective_hparam_specs",
    "resolve_hparams",
    "objectives_accepting",
    "REDUCTIONS",
    "RA_DISTANCES",
    "RA_ON",
    "RA_GRADIENT",
    "SFT_WEIGHT",
    "SOLO_ALPHA",
    "NLL_WEIGHT",
    "LONGPO_OBJECTIVE",
]

REDUCTIONS = ("mean", "sum", "none")
RA_DISTANCES = ("abs", "squared")
RA_ON = ("chosen", "both")
# Where the SoLo-RA term's gradient flows (the paper does not say; docs/objectives.md "ra_gradient"):
# "both" differentiates |r(x_short, y) - r(x_long, y)| on both sides, the formula read literally;
# "long" holds r(x_short, y) fixed, a target that the long-context reward is pulled towards.
RA_GRADIENT = ("both", "long")
# The only base objective LongPO is defined for (its reference on x_short replaces DPO's reference).
LONGPO_OBJECTIVE = "dpo"

SFT_WEIGHT = HParam(0.0, "weight of the length-averaged NLL -logp(y_w|x)/|y_w| of the chosen response", low=0.0)
SOLO_ALPHA = HParam(1.0, "weight alpha of the short-to-long reward alignment (SoLo-RA) term", low=0.0)
# LongPO's public training script uses dpo_lambda=0.01 (and dpo_beta=0.01).
NLL_WEIGHT = HParam(0.01, "LongPO: weight of the length-averaged NLL of the chosen response under x_long", low=0.0)

_SOLO_KEYS = ("alpha", "ra_distance", "ra_on", "ra_gradient")

COUNT_METRICS = frozenset({"orpo/clamped"})
"""Metrics that count events (summed over pairs, never averaged); the trainer reports them as totals."""


# ------------------------------------------------------------------------------------- validation
def objective_hparam_specs(name: str) -> dict[str, HParam]:
    """Every hyperparameter `preference_loss(name, ...)` accepts: the objective's own plus sft_weight."""
    return {**get_objective(name).hparams, "sft_weight": SFT_WEIGHT}


def objectives_accepting(hparam: str) -> list[str]:
    """Registered objectives that have a hyperparameter called `hparam` (for error messages)."""
    return [n for n in registered_objectives() if hparam in get_objective(n).hparams]


def resolve_hparams(specs: Mapping[str, HParam], given: Mapping[str, object], where: str) -> dict[str, float]:
    """`given` with defaults filled in from `specs` and every value checked.

    An unknown name is a ValueError (never silently ignored); a bad value a TypeError/ValueError.
    """
    unknown = sorted(set(given) - set(specs))
    if unknown:
        owners = {u: objectives_accepting(u) for u in unknown}
        raise ValueError(
            f"{where}: unknown hyperparameter(s) {unknown} (used by: {owners}); this call accepts "
            f"{sorted(specs)}. Remove them or choose the objective they belong to."
        )
    return {key: spec.check(key, given.get(key, spec.default), where) for key, spec in specs.items()}


def _check_choice(value: object, choices: tuple[str, ...], what: str, where: str) -> str:
    if value not in choices:
        raise ValueError(f"{where}: {what}={value!r} is not one of {list(choices)}")
    return value  # type: ignore[return-value]


def _check_references(objective: PreferenceObjective, refs: Mapping[str, object], where: str) -> None:
    """DPO/IPO need every listed reference; reference-free objectives accept none (it would be ignored)."""
    if objective.needs_reference:
        missing = [key for key, value in refs.items() if value is None]
        if missing:
            raise ValueError(
                f"{where}: objective {objective.name!r} needs reference-model log-probs; missing {missing}. "
                f"Compute them with the frozen reference model (`solopo precompute-ref`) or use a "
                f"reference-free objective (simpo, orpo)."
            )
    else:
        given = [key for key, value in refs.items() if value is not None]
        if given:
            raise ValueError(
                f"{where}: objective {objective.name!r} is reference-free but got {given}; drop them "
                f"(they would be ignored), or use dpo/ipo if a reference model is intended."
            )


def _check_inputs(
    logps: Mapping[str, torch.Tensor | None], tokens: Mapping[str, object], where: str, check_values: bool = True
) -> torch.dtype:
    """Type, shape, device and (with check_values) value checks of all inputs; returns the dtype to compute in.

    Finiteness and positivity are checked with one host sync for all tensors together; check_values=False
    skips that sync (non-finite inputs then give a non-finite loss instead of an error).
    """
    given_logps = {key: value for key, value in logps.items() if value is not None}
    tensors = {**given_logps, **tokens}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}: {key} must be a torch.Tensor of shape [B], got {type(value).__name__}")
    for key, value in given_logps.items():
        if not value.is_floating_point():
            raise TypeError(f"{where}: {key} must be a floating-point tensor of log-prob sums, got {value.dtype}")
    for key, value in tokens.items():
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{where}: {key} must hold response token counts (int or float), got {value.dtype}")
    first_key, first = next(iter(tensors.items()))
    for key, value in tensors.items():
        if value.dim() != 1 or value.shape != first.shape:
            raise ValueError(
                f"{where}: shape mismatch: {key} has shape {list(value.shape)} but {first_key} has "
                f"{list(first.shape)}; every input holds one value per preference pair, shape [B]"
            )
        if value.device != first.device:
            raise ValueError(f"{where}: {key} is on {value.device} but {first_key} is on {first.device}")
    if first.numel() == 0:
        raise ValueError(f"{where}: empty batch (B = 0); call the loss only for micro-batches with pairs")
    if check_values:
        _check_values(given_logps, tokens, where)
    compute_dtype = torch.float32
    for value in given_logps.values():
        compute_dtype = torch.promote_types(compute_dtype, value.dtype)
    return compute_dtype


def _check_values(logps: Mapping[str, torch.Tensor], tokens: Mapping[str, torch.Tensor], where: str) -> None:
    bad_logps = [~torch.isfinite(value.detach()).all() for value in logps.values()]
    bad_tokens = [~((value.detach() > 0) & torch.isfinite(value.detach())).all() for value in tokens.values()]
    flags = torch.stack(bad_logps + bad_tokens).tolist()  # the single host sync
    names = list(logps) + list(tokens)
    for name, bad in zip(names, flags):
        if not bad:
            continue
        if name in tokens:
            raise ValueError(
                f"{where}: {name} must be finite and > 0 (a pair with an empty response cannot be "
                f"scored; filter it out in the data pipeline), got {tokens[name].tolist()}"
            )
        raise ValueError(
            f"{where}: {name} contains NaN or inf (a diverged model, or a padding/masking bug in the "
            f"log-prob computation): {logps[name].tolist()}"
        )


# ----------------------------------------------------------------------------------- loss terms
def _cast(seq: SequenceStats, dtype: torch.dtype) -> SequenceStats:
    """`seq` in the dtype the loss is computed in (every tensor, the token counts included)."""
    ref = seq.ref_logps
    return SequenceStats(logps=seq.logps.to(dtype), tokens=seq.tokens.to(dtype),
                         ref_logps=None if ref is None else ref.to(dtype))


def _token_counts(chosen: SequenceStats, rejected: SequenceStats,
                  *long: SequenceStats | None) -> dict[str, torch.Tensor]:
    """The response token counts to check, by name. The long sequences share their response's count
    with the short ones (same response); one handed a different tensor is checked under its own name."""
    counts = {"chosen_tokens": chosen.tokens, "rejected_tokens": rejected.tokens}
    for role, short, seq in zip(("long_chosen", "long_rejected"), (chosen, rejected), long):
        if seq is not None and seq.tokens is not short.tokens:
            counts[f"{role}_tokens"] = seq.tokens
    return counts


def _po_terms(
    objective: PreferenceObjective,
    chosen: SequenceStats,
    rejected: SequenceStats,
    hparams: Mapping[str, float],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Base objective + optional SFT term on one context. Returns (loss [B], per-pair metrics [B])."""
    objective_hparams = {key: hparams[key] for key in objective.hparams}
    po_loss, components = objective.pair_loss(chosen, rejected, objective_hparams)
    loss = po_loss
    metrics = {"loss/po": po_loss, **components}
    if hparams["sft_weight"] > 0:
        sft_loss = hparams["sft_weight"] * -chosen.mean_logps
        loss = loss + sft_loss
        metrics["loss/sft"] = sft_loss
    chosen_reward = objective.reward(chosen, objective_hparams)
    rejected_reward = objective.reward(rejected, objective_hparams)
    metrics.update(_reward_metrics(chosen_reward, rejected_reward))
    metrics.update(_counters(objective, (chosen, rejected), objective_hparams))
    return loss, metrics


def _reward_metrics(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/margin": chosen_reward - rejected_reward,
        "rewards/accuracy": (chosen_reward > rejected_reward).to(chosen_reward.dtype),
    }


def _counters(
    objective: PreferenceObjective, sequences: tuple[SequenceStats, ...], hparams: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """Per-pair event counts summed over all sequences that entered the loss."""
    totals: dict[str, torch.Tensor] = {}
    for seq in sequences:
        for key, count in objective.counters(seq, hparams).items():
            totals[key] = totals[key] + count if key in totals else count
    return totals


def _ra_penalty(
    objective: PreferenceObjective,
    short: SequenceStats,
    long: SequenceStats,
    hparams: Mapping[str, float],
    ra_distance: str,
    ra_gradient: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """s(|r(x_short, y) - r(x_long, y)|) for one response. Returns (penalty, distance, long reward), [B] each.

    ra_gradient="long" detaches the short side, so this term moves only the long-context reward;
    the short sequence still gets its gradient from the PO term.
    """
    if ra_gradient == "long":
        short = SequenceStats(logps=short.logps.detach(), tokens=short.tokens, ref_logps=short.ref_logps)
    long_reward = objective.reward(long, hparams)
    distance = (objective.reward(short, hparams) - long_reward).abs()
    penalty = distance if ra_distance == "abs" else distance * distance
    return penalty, distance, long_reward


def _check_ra_on_inputs(
    ra_on: str, long_rejected_logps: object, ref_long_rejected_logps: object, where: str
) -> None:
    """ra_on='both' needs the long rejected sequence; chosen-only must not be handed one (wasted pass)."""
    if ra_on == "both":
        if long_rejected_logps is None:
            raise ValueError(f"{where}: ra_on='both' aligns the rejected response too; pass long_rejected_logps")
        return
    given = {"long_rejected_logps": long_rejected_logps, "ref_long_rejected_logps": ref_long_rejected_logps}
    extra = [key for key, value in given.items() if value is not None]
    if extra:
        raise ValueError(
            f"{where}: {extra} given but ra_on='chosen' (chosen-only SoLo-RA) does not use them; "
            f"pass ra_on='both' or drop them (a wasted long forward pass)"
        )


def _ra_terms(
    objective: PreferenceObjective,
    aligned: Mapping[str, tuple[SequenceStats, SequenceStats]],
    hparams: Mapping[str, float],
    ra_distance: str,
    ra_gradient: str,
    alpha: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha * sum over aligned responses ("chosen"[, "rejected"]) of s(|r(x_short, y) - r(x_long, y)|).

    Returns (loss/ra [B], per-pair metrics incl. the long sequences' counters).
    """
    penalties = []
    metrics: dict[str, torch.Tensor] = {}
    for response, (short, long) in aligned.items():
        penalty, distance, long_reward = _ra_penalty(objective, short, long, hparams, ra_distance, ra_gradient)
        penalties.append(penalty)
        metrics["ra/distance" if response == "chosen" else f"ra/distance_{response}"] = distance
        metrics[f"rewards/long_{response}"] = long_reward
    metrics["loss/ra"] = alpha * sum(penalties)
    metrics.update(_counters(objective, tuple(long for _, long in aligned.values()), hparams))
    return metrics["loss/ra"], metrics


def _reduce(
    loss: torch.Tensor, metrics: Mapping[str, torch.Tensor], reduction: str
) -> tuple[torch.Tensor, dict[str, object]]:
    detached = {key: value.detach() for key, value in metrics.items()}
    if reduction == "none":
        return loss, detached
    stacked = torch.stack(list(detached.values()))  # [num_metrics, B]
    sums = stacked.sum(dim=1)
    if reduction == "sum":
        return loss.sum(), dict(zip(detached, sums.unbind(0)))
    means = stacked.mean(dim=1)
    is_count = torch.tensor([key in COUNT_METRICS for key in detached], device=sums.device)
    values = torch.where(is_count, sums, means).tolist()  # one host sync for all metrics
    return loss.mean(), dict(zip(detached, values))


# -------------------------------------------------------------------------------------- public API
def preference_loss(
    name: str,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    reduction: str = "mean",
    **hparams: float,
) -> tuple[torch.Tensor, dict[str, object]]:
    """Base preference loss L_PO(x; y_w, y_l) of objective `name` on one context for every pair.

    All log-probs are [B] sums over response tokens; chosen_tokens / rejected_tokens are the [B]
    response token counts |y_w|, |y_l|. Used directly for the short-only, long-X and expand-long
    baselines: the caller decides which context (x_short or x_long) the log-probs were computed on.
    hparams: the objective's own (dpo: beta, label_smoothing; ipo: beta; simpo: beta, gamma,
    label_smoothing; orpo: lam) plus sft_weight (adds sft_weight * -logp(y_w|x)/|y_w|).
    Returns (loss, metrics), see the module docstring for `reduction` and the metric names.
    """
    where = f"preference_loss({name!r})"
    resolved = resolve_hparams(objective_hparam_specs(name), hparams, where)
    _check_choice(reduction, REDUCTIONS, "reduction", where)
    chosen = SequenceStats(chosen_logps, chosen_tokens, ref_chosen_logps)
    rejected = SequenceStats(rejected_logps, rejected_tokens, ref_rejected_logps)
    return resolved_preference_loss(name, chosen, rejected, reduction=reduction, hparams=resolved, check_values=True)


def resolved_preference_loss(
    name: str,
    chosen: SequenceStats,
    rejected: SequenceStats,
    *,
    reduction: str,
    hparams: Mapping[str, object],
    check_values: bool = False,
) -> tuple[torch.Tensor, dict[str, object]]:
    """`preference_loss` on the chosen and rejected sequences' statistics (on one context), with
    `hparams` already resolved (every one present and checked, e.g. `ObjectiveConfig.resolved_hparams`):
    nothing is re-validated, and without check_values the inputs' values are not checked either (no
    host sync; NaN/Inf inputs give a NaN/Inf loss). Their types and shapes always are."""
    where = f"preference_loss({name!r})"
    objective = get_objective(name)
    refs = {"ref_chosen_logps": chosen.ref_logps, "ref_rejected_logps": rejected.ref_logps}
    _check_references(objective, refs, where)
    dtype = _check_inputs({"chosen_logps": chosen.logps, "rejected_logps": rejected.logps, **refs},
                          _token_counts(chosen, rejected), where, check_values)
    loss, metrics = _po_terms(objective, _cast(chosen, dtype), _cast(rejected, dtype), hparams)
    return _reduce(loss, metrics, reduction)


def solopo_loss(
    name: str,
    short_chosen_logps: torch.Tensor,
    short_rejected_logps: torch.Tensor,
    long_chosen_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    ref_short_chosen_logps: torch.Tensor | None = None,
    ref_short_rejected_logps: torch.Tensor | None = None,
    ref_long_chosen_logps: torch.Tensor | None = None,
    long_rejected_logps: torch.Tensor | None = None,
    ref_long_rejected_logps: torch.Tensor | None = None,
    alpha: float = 1.0,
    ra_distance: str = "abs",
    ra_on: str = "chosen",
    reduction: str = "mean",
    ra_gradient: str = "both",
    **hparams: float,
) -> tuple[torch.Tensor, dict[str, object]]:
    """The SoLoPO objective (SoLoPO paper, general objective L_SoLoPO) for base objective `name`:

        L = L_PO(x_short; y_w, y_l) + alpha * s(|r(x_short, y_w) - r(x_long, y_w)|)

    with r the base objective's implicit reward and s(d) = d (ra_distance="abs", default) or d^2
    ("squared"). ra_on="chosen" is the paper's chosen-only SoLo-RA; ra_on="both" adds the same term
    for y_l (the paper's ablation) and then needs long_rejected_logps. ra_gradient="both" (default,
    the formula read literally) differentiates the RA term on both sides; "long" treats r(x_short, y)
    as a fixed target (no gradient from the RA term into the short sequences; the PO term is
    unchanged), a reading the paper does not state (docs/objectives.md). Response token counts are
    shared by both contexts (the response is identical). DPO/IPO need the reference log-probs of
    every sequence the policy scores: (x_short, y_w), (x_short, y_l), (x_long, y_w) [, (x_long, y_l)].
    hparams are those of `preference_loss`; sft_weight applies to the short chosen.

    The public functional form, one tensor per argument (hence its many parameters): it checks every
    input and value and bundles them into `SequenceStats` for `resolved_solopo_loss`, which the
    trainer calls directly (`objective_loss`).
    """
    where = f"solopo_loss({name!r})"
    resolved = resolve_hparams(objective_hparam_specs(name), hparams, where)
    resolved["alpha"] = SOLO_ALPHA.check("alpha", alpha, where)
    resolved["ra_distance"] = _check_choice(ra_distance, RA_DISTANCES, "ra_distance", where)
    resolved["ra_on"] = _check_choice(ra_on, RA_ON, "ra_on", where)
    resolved["ra_gradient"] = _check_choice(ra_gradient, RA_GRADIENT, "ra_gradient", where)
    _check_choice(reduction, REDUCTIONS, "reduction", where)
    # here, before bundling: a reference for the long rejected without its policy sums has no bundle
    _check_ra_on_inputs(ra_on, long_rejected_logps, ref_long_rejected_logps, where)
    long_rejected = (None if long_rejected_logps is None else
                     SequenceStats(long_rejected_logps, rejected_tokens, ref_long_rejected_logps))
    return resolved_solopo_loss(
        name, SequenceStats(short_chosen_logps, chosen_tokens, ref_short_chosen_logps),
        SequenceStats(short_rejected_logps, rejected_tokens, ref_short_rejected_logps),
        SequenceStats(long_chosen_logps, chosen_tokens, ref_long_chosen_logps), long_rejected,
        reduction=reduction, hparams=resolved, check_values=True,
    )


def resolved_solopo_loss(
    name: str,
    short_chosen: SequenceStats,
    short_rejected: SequenceStats,
    long_chosen: SequenceStats,
    long_rejected: SequenceStats | None = None,
    *,
    reduction: str,
    hparams: Mapping[str, object],
    check_values: bool = False,
) -> tuple[torch.Tensor, dict[str, object]]:
    """`solopo_loss` on the statistics of each scored sequence (long_rejected: with ra_on="both"
    only), with `hparams` already resolved (the objective's, sft_weight, alpha, ra_distance, ra_on,
    ra_gradient; e.g. `ObjectiveConfig.resolved_hparams`): see `resolved_preference_loss`."""
    where = f"solopo_loss({name!r})"
    objective = get_objective(name)
    resolved = {key: value for key, value in hparams.items() if key not in _SOLO_KEYS}
    alpha, ra_distance, ra_on, ra_gradient = (hparams[key] for key in _SOLO_KEYS)
    _check_ra_on_inputs(ra_on, *_logps_of(long_rejected), where)
    refs = {
        "ref_short_chosen_logps": short_chosen.ref_logps,
        "ref_short_rejected_logps": short_rejected.ref_logps,
        "ref_long_chosen_logps": long_chosen.ref_logps,
    }
    if ra_on == "both":
        refs["ref_long_rejected_logps"] = long_rejected.ref_logps
    _check_references(objective, refs, where)
    dtype = _check_inputs(
        {
            "short_chosen_logps": short_chosen.logps,
            "short_rejected_logps": short_rejected.logps,
            "long_chosen_logps": long_chosen.logps,
            "long_rejected_logps": _logps_of(long_rejected)[0],
            **refs,
        },
        _token_counts(short_chosen, short_rejected, long_chosen, long_rejected),
        where,
        check_values,
    )
    short_chosen, short_rejected = _cast(short_chosen, dtype), _cast(short_rejected, dtype)
    aligned = {"chosen": (short_chosen, _cast(long_chosen, dtype))}
    if ra_on == "both":
        aligned["rejected"] = (short_rejected, _cast(long_rejected, dtype))
    po_loss, metrics = _po_terms(objective, short_chosen, short_rejected, resolved)
    objective_hparams = {key: resolved[key] for key in objective.hparams}
    ra_loss, ra_metrics = _ra_terms(objective, aligned, objective_hparams, ra_distance, ra_gradient, alpha)
    for key, value in ra_metrics.items():  # counters (e.g. orpo/clamped) add up across sequences
        metrics[key] = metrics[key] + value if key in metrics else value
    return _reduce(po_loss + ra_loss, metrics, reduction)


def _logps_of(seq: SequenceStats | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(policy sums, reference sums) of an optional sequence; (None, None) when it is absent."""
    return (None, None) if seq is None else (seq.logps, seq.ref_logps)


def longpo_loss(
    long_chosen_logps: torch.Tensor,
    long_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    ref_short_chosen_logps: torch.Tensor,
    ref_short_rejected_logps: torch.Tensor,
    nll_weight: float = NLL_WEIGHT.default,
    reduction: str = "mean",
    **hparams: float,
) -> tuple[torch.Tensor, dict[str, object]]:
    """The LongPO baseline (Chen et al., ICLR 2025): DPO with a short-to-long reference, plus NLL.

        z = (logp(y_w|x_long) - ref(y_w|x_short)) - (logp(y_l|x_long) - ref(y_l|x_short))
        L = -(1-eps) logsig(beta z) - eps logsig(-beta z) + nll_weight * (-logp(y_w|x_long) / |y_w|)

    The NLL is length-averaged (mean over the chosen response's tokens). hparams: beta,
    label_smoothing (DPO's). Rewards are beta * (logp(y|x_long) - ref(y|x_short)).
    """
    where = "longpo_loss"
    if "sft_weight" in hparams:
        raise ValueError(f"{where}: LongPO's chosen-NLL term is weighted by nll_weight; sft_weight is not accepted")
    resolved = resolve_hparams(get_objective(LONGPO_OBJECTIVE).hparams, hparams, where)
    resolved["nll_weight"] = NLL_WEIGHT.check("nll_weight", nll_weight, where)
    _check_choice(reduction, REDUCTIONS, "reduction", where)
    # LongPO's reference scores the response on x_short: the sequences carry it as their reference
    return resolved_longpo_loss(SequenceStats(long_chosen_logps, chosen_tokens, ref_short_chosen_logps),
                                SequenceStats(long_rejected_logps, rejected_tokens, ref_short_rejected_logps),
                                reduction=reduction, hparams=resolved, check_values=True)


def resolved_longpo_loss(
    long_chosen: SequenceStats,
    long_rejected: SequenceStats,
    *,
    reduction: str,
    hparams: Mapping[str, object],
    check_values: bool = False,
) -> tuple[torch.Tensor, dict[str, object]]:
    """`longpo_loss` on the long chosen and rejected sequences, whose `ref_logps` are the reference
    model's sums on x_short (LongPO's short-to-long reference), with `hparams` already resolved (DPO's
    and nll_weight; e.g. `ObjectiveConfig.resolved_hparams` in mode longpo): see `resolved_preference_loss`."""
    where = "longpo_loss"
    objective = get_objective(LONGPO_OBJECTIVE)
    resolved = {key: value for key, value in hparams.items() if key != "nll_weight"}
    nll_weight = hparams["nll_weight"]
    refs = {"ref_short_chosen_logps": long_chosen.ref_logps, "ref_short_rejected_logps": long_rejected.ref_logps}
    _check_references(objective, refs, where)
    dtype = _check_inputs(
        {"long_chosen_logps": long_chosen.logps, "long_rejected_logps": long_rejected.logps, **refs},
        _token_counts(long_chosen, long_rejected),
        where,
        check_values,
    )
    chosen, rejected = _cast(long_chosen, dtype), _cast(long_rejected, dtype)
    loss, metrics = _po_terms(objective, chosen, rejected, {**resolved, "sft_weight": 0.0})
    nll_loss = nll_weight * -chosen.mean_logps
    metrics["loss/nll"] = nll_loss
    return _reduce(loss + nll_loss, metrics, reduction)
