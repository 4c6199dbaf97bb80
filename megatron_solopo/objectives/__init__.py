"""Preference objectives: DPO, IPO, SimPO, ORPO, their SoLoPO forms, and the LongPO baseline.

Pure PyTorch, no other import from megatron_solopo: functions of per-sequence response log-prob sums
and response token counts. See docs/objectives.md for every formula, default and forward-pass cost.

    from megatron_solopo.objectives import preference_loss, solopo_loss
    loss, metrics = solopo_loss("orpo", short_chosen_logps, short_rejected_logps, long_chosen_logps,
                                chosen_tokens, rejected_tokens, alpha=1.0)
"""

from megatron_solopo.objectives import builtin as _builtin  # noqa: F401  (registers dpo, ipo, simpo, orpo)
from megatron_solopo.objectives.builtin import orpo_clamp_eps, orpo_log_odds
from megatron_solopo.objectives.config import (
    MODES,
    PO_TERM_SEQUENCES,
    SEQUENCES,
    ObjectiveConfig,
    logps_key,
    needs_reference,
    objective_loss,
    required_batch_keys,
    required_reference_sequences,
    required_sequences,
    sequence_stats,
)
from megatron_solopo.objectives.losses import (
    COUNT_METRICS,
    NLL_WEIGHT,
    RA_DISTANCES,
    RA_ON,
    RA_GRADIENT,
    REDUCTIONS,
    SFT_WEIGHT,
    SOLO_ALPHA,
    longpo_loss,
    objective_hparam_specs,
    preference_loss,
    solopo_loss,
)
from megatron_solopo.objectives.registry import (
    HParam,
    PreferenceObjective,
    SequenceStats,
    get_objective,
    register_objective,
    registered_objectives,
    unregister_objective,
)

__all__ = [
    "COUNT_METRICS",
    "preference_loss",
    "solopo_loss",
    "longpo_loss",
    "objective_loss",
    "ObjectiveConfig",
    "MODES",
    "SEQUENCES",
    "PO_TERM_SEQUENCES",
    "required_sequences",
    "required_reference_sequences",
    "required_batch_keys",
    "needs_reference",
    "logps_key",
    "sequence_stats",
    "objective_hparam_specs",
    "REDUCTIONS",
    "RA_DISTANCES",
    "RA_ON",
    "RA_GRADIENT",
    "SFT_WEIGHT",
    "SOLO_ALPHA",
    "NLL_WEIGHT",
    "HParam",
    "PreferenceObjective",
    "SequenceStats",
    "register_objective",
    "unregister_objective",
    "get_objective",
    "registered_objectives",
    "orpo_log_odds",
    "orpo_clamp_eps",
]
