"""ObjectiveConfig validation and defaults, required sequences, and the mode dispatcher."""

import math

import pytest
import torch

from megatron_solopo.objectives import (
    MODES,
    SEQUENCES,
    ObjectiveConfig,
    logps_key,
    longpo_loss,
    needs_reference,
    objective_loss,
    preference_loss,
    required_batch_keys,
    required_reference_sequences,
    required_sequences,
    solopo_loss,
)

SC, SR, LC, LR = "short_chosen", "short_rejected", "long_chosen", "long_rejected"


# ---------------------------------------------------------------------------------- defaults
def test_default_config_is_solo_orpo():
    config = ObjectiveConfig()
    assert (config.name, config.mode) == ("orpo", "solo")
    assert config.resolved_hparams == {"lam": 0.1, "sft_weight": 0.0, "alpha": 1.0, "ra_distance": "abs", "ra_on": "chosen",
                                       "ra_gradient": "both"}


@pytest.mark.parametrize("name, expected", [
    ("dpo", {"beta": 0.1, "label_smoothing": 0.0}),
    ("ipo", {"beta": 0.1}),
    ("simpo", {"beta": 2.0, "gamma": 1.0, "label_smoothing": 0.0}),
    ("orpo", {"lam": 0.1}),
])
def test_per_objective_defaults(name, expected):
    assert ObjectiveConfig(name=name, mode="long").resolved_hparams == {**expected, "sft_weight": 0.0}


def test_explicit_values_and_longpo_hparams():
    config = ObjectiveConfig(name="dpo", mode="solo", beta=0.05, alpha=3.0, ra_distance="squared", ra_on="both",
                             ra_gradient="long", sft_weight=0.2)
    assert config.resolved_hparams == {"beta": 0.05, "label_smoothing": 0.0, "sft_weight": 0.2, "alpha": 3.0,
                                "ra_distance": "squared", "ra_on": "both", "ra_gradient": "long"}
    assert ObjectiveConfig(name="dpo", mode="longpo").resolved_hparams == {"beta": 0.1, "label_smoothing": 0.0,
                                                                    "nll_weight": 0.01}
    assert ObjectiveConfig(name="dpo", mode="longpo", nll_weight=1.0).resolved_hparams["nll_weight"] == 1.0


def test_every_field_has_a_docstring_in_the_source():
    import inspect

    from megatron_solopo.objectives import config as module

    source = inspect.getsource(module.ObjectiveConfig)
    for field in ObjectiveConfig.__dataclass_fields__:
        after = source.split(f"    {field}:", 1)[1].split("\n", 2)[1]
        assert after.strip().startswith('"""'), field


# -------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, match", [
    (dict(name="dpo", gamma=1.0),
     r"objective.gamma=1.0 is not a hyperparameter of 'dpo' \(it belongs to \['simpo'\]\)"),
    (dict(name="orpo", beta=0.1), "objective.beta=0.1 is not a hyperparameter of 'orpo'"),
    (dict(name="simpo", lam=0.1), "objective.lam=0.1 is not a hyperparameter of 'simpo'"),
    (dict(name="ipo", label_smoothing=0.1), "label_smoothing=0.1 is not a hyperparameter of 'ipo'"),
    (dict(name="dpo", mode="long", alpha=3.0), "objective.alpha=3.0 is not used with mode 'long'"),
    (dict(name="dpo", mode="short", ra_on="both"), "objective.ra_on='both' is not used with mode 'short'"),
    (dict(name="dpo", mode="expand_long", ra_distance="abs"), "ra_distance='abs' is not used with mode"),
    (dict(name="dpo", mode="solo", nll_weight=0.1), "nll_weight=0.1 is not used with mode 'solo'"),
    (dict(name="dpo", mode="longpo", sft_weight=0.1), "sft_weight=0.1 is not used with mode 'longpo'"),
    (dict(name="simpo", mode="longpo"), "mode='longpo' is defined for DPO only"),
    (dict(name="dpo", mode="longpo", gamma=1.0), "gamma=1.0 is not a hyperparameter of 'dpo'"),
    (dict(mode="sololong"), "objective.mode='sololong' is not one of"),
    (dict(name="kto"), "unknown preference objective 'kto'"),
    (dict(name="dpo", beta=-0.1), r"beta=-0.1 is outside its allowed range \(0, inf\)"),
    (dict(name="orpo", alpha=-1.0), "alpha=-1.0 is outside"),
    (dict(name="orpo", ra_distance="l1"), "objective.ra_distance='l1' is not one of"),
    (dict(name="orpo", ra_on="rejected"), "objective.ra_on='rejected' is not one of"),
    (dict(name="orpo", ra_gradient="short"), r"objective.ra_gradient='short' is not one of \['both', 'long'\]"),
    (dict(name="orpo", mode="long", ra_gradient="long"), "objective.ra_gradient='long' is not used with mode 'long'"),
    (dict(name="dpo", mode="longpo", nll_weight=-1.0), "nll_weight=-1.0 is outside"),
    (dict(name="simpo", gamma=math.nan), "gamma=nan is outside"),
])
def test_invalid_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ObjectiveConfig(**kwargs)


def test_wrong_types():
    with pytest.raises(TypeError, match="1.0e-6"):
        ObjectiveConfig(name="dpo", beta="1e-6")
    with pytest.raises(TypeError, match="real number"):
        ObjectiveConfig(name="orpo", alpha=True)


# ------------------------------------------------------------------------------ sequences
@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "orpo"])
@pytest.mark.parametrize("mode, policy", [
    ("solo", {SC, SR, LC}), ("short", {SC, SR}), ("long", {LC, LR}), ("expand_long", {LC, LR}),
])
def test_required_sequences(name, mode, policy):
    config = ObjectiveConfig(name=name, mode=mode)
    assert required_sequences(config) == policy
    reference = policy if name in ("dpo", "ipo") else set()
    assert required_reference_sequences(config) == reference
    assert needs_reference(config) == bool(reference)
    keys = {f"{s}_logps" for s in policy} | {f"ref_{s}_logps" for s in reference} | {"chosen_tokens", "rejected_tokens"}
    assert required_batch_keys(config) == keys


def test_required_sequences_solo_both_and_longpo():
    both = ObjectiveConfig(name="simpo", mode="solo", ra_on="both")
    assert required_sequences(both) == {SC, SR, LC, LR} and not needs_reference(both)
    assert required_reference_sequences(ObjectiveConfig(name="dpo", ra_on="both")) == {SC, SR, LC, LR}
    longpo = ObjectiveConfig(name="dpo", mode="longpo")
    assert required_sequences(longpo) == {LC, LR}
    assert required_reference_sequences(longpo) == {SC, SR}


def test_every_mode_is_documented_and_dispatched():
    assert set(MODES) == {"solo", "short", "long", "expand_long", "longpo"}
    assert logps_key(LC) == "long_chosen_logps" and logps_key(SR, reference=True) == "ref_short_rejected_logps"
    with pytest.raises(ValueError, match="unknown sequence"):
        logps_key("medium_chosen")


# ----------------------------------------------------------------------------- dispatcher
def _all_stats():
    """Distinct values per sequence so that feeding the wrong one changes the loss."""
    values = {SC: [-3.0, -6.0], SR: [-7.0, -5.0], LC: [-9.0, -8.0], LR: [-8.5, -4.0]}
    stats = {}
    for i, seq in enumerate(SEQUENCES):
        stats[logps_key(seq)] = torch.tensor(values[seq], dtype=torch.float64)
        stats[logps_key(seq, reference=True)] = torch.tensor(values[seq], dtype=torch.float64) - 0.5 * (i + 1)
    stats["chosen_tokens"] = torch.tensor([3, 4])
    stats["rejected_tokens"] = torch.tensor([5, 2])
    return stats


def _stats_for(config):
    keys = required_batch_keys(config)
    return {k: v for k, v in _all_stats().items() if k in keys}


@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "orpo"])
@pytest.mark.parametrize("mode", ["short", "long", "expand_long"])
def test_dispatch_single_context_modes(name, mode):
    config = ObjectiveConfig(name=name, mode=mode)
    stats = _stats_for(config)
    ctx = "short" if mode == "short" else "long"
    ref = name in ("dpo", "ipo")
    expected, expected_m = preference_loss(
        name, stats[f"{ctx}_chosen_logps"], stats[f"{ctx}_rejected_logps"], stats["chosen_tokens"],
        stats["rejected_tokens"], stats.get(f"ref_{ctx}_chosen_logps") if ref else None,
        stats.get(f"ref_{ctx}_rejected_logps") if ref else None, reduction="sum",
    )
    loss, metrics = objective_loss(config, stats)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-14)
    assert metrics.keys() == expected_m.keys()


@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "orpo"])
@pytest.mark.parametrize("ra_on", ["chosen", "both"])
def test_dispatch_solo(name, ra_on):
    config = ObjectiveConfig(name=name, mode="solo", alpha=2.0, ra_on=ra_on, ra_distance="squared")
    stats = _stats_for(config)
    ref = {k: v for k, v in stats.items() if k.startswith("ref_")}
    expected, _ = solopo_loss(
        name, stats["short_chosen_logps"], stats["short_rejected_logps"], stats["long_chosen_logps"],
        stats["chosen_tokens"], stats["rejected_tokens"], long_rejected_logps=stats.get("long_rejected_logps"),
        alpha=2.0, ra_on=ra_on, ra_distance="squared", reduction="none", **ref,
    )
    loss, metrics = objective_loss(config, stats, reduction="none")
    assert torch.allclose(loss, expected, rtol=1e-14)
    assert ("ra/distance_rejected" in metrics) == (ra_on == "both")


def test_dispatch_solo_dpo_hand_value():
    """The dispatcher must read the short pair for the PO term and long chosen only for SoLo-RA."""
    config = ObjectiveConfig(name="dpo", mode="solo", alpha=3.0)
    stats = _stats_for(config)
    beta = 0.1
    total = 0.0
    for i in range(2):
        z = (stats["short_chosen_logps"][i] - stats["ref_short_chosen_logps"][i]) - (
            stats["short_rejected_logps"][i] - stats["ref_short_rejected_logps"][i])
        po = math.log1p(math.exp(-beta * z.item()))
        r_short = beta * (stats["short_chosen_logps"][i] - stats["ref_short_chosen_logps"][i]).item()
        r_long = beta * (stats["long_chosen_logps"][i] - stats["ref_long_chosen_logps"][i]).item()
        total += po + 3.0 * abs(r_short - r_long)
    loss, _ = objective_loss(config, stats)
    assert loss.item() == pytest.approx(total, rel=1e-13)


def test_dispatch_longpo():
    config = ObjectiveConfig(name="dpo", mode="longpo", nll_weight=0.5, beta=0.2)
    stats = _stats_for(config)
    assert set(stats) == {"long_chosen_logps", "long_rejected_logps", "ref_short_chosen_logps",
                          "ref_short_rejected_logps", "chosen_tokens", "rejected_tokens"}
    expected, _ = longpo_loss(stats["long_chosen_logps"], stats["long_rejected_logps"], stats["chosen_tokens"],
                              stats["rejected_tokens"], stats["ref_short_chosen_logps"],
                              stats["ref_short_rejected_logps"], nll_weight=0.5, beta=0.2, reduction="mean")
    loss, metrics = objective_loss(config, stats, reduction="mean")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-14)
    assert "loss/nll" in metrics


def test_dispatch_rejects_missing_and_unused_stats():
    config = ObjectiveConfig(name="simpo", mode="solo")
    stats = _stats_for(config)
    with pytest.raises(ValueError, match=r"missing \['long_chosen_logps'\]"):
        objective_loss(config, {k: v for k, v in stats.items() if k != "long_chosen_logps"})
    with pytest.raises(ValueError, match=r"unused \['ref_short_chosen_logps'\]"):
        objective_loss(config, {**stats, "ref_short_chosen_logps": stats["short_chosen_logps"]})
    with pytest.raises(ValueError, match=r"unused \['long_rejected_logps'\]"):
        objective_loss(config, {**stats, "long_rejected_logps": stats["short_chosen_logps"]})
    with pytest.raises(ValueError, match=r"missing \['chosen_tokens'\]"):
        objective_loss(config, {k: v for k, v in stats.items() if k != "chosen_tokens"})
    # keys that are not log-probs (e.g. bookkeeping) are not read
    objective_loss(config, {**stats, "num_pairs": 2})


def test_dispatch_default_reduction_is_sum():
    config = ObjectiveConfig(name="orpo", mode="short")
    loss_sum, metrics = objective_loss(config, _stats_for(config))
    loss_none, _ = objective_loss(config, _stats_for(config), reduction="none")
    assert loss_sum.item() == pytest.approx(loss_none.sum().item(), rel=1e-14)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())


def test_ra_gradient_from_yaml_and_overrides(tmp_path):
    from megatron_solopo.config import ConfigError, load_config

    path = tmp_path / "run.yaml"
    path.write_text("objective: {name: simpo, mode: solo, ra_gradient: long}\n", encoding="utf-8")
    assert load_config(path).objective.resolved_hparams["ra_gradient"] == "long"
    assert load_config(path, ["objective.ra_gradient=both"]).objective.resolved_hparams["ra_gradient"] == "both"
    with pytest.raises((ConfigError, ValueError), match="ra_gradient='upward' is not one of"):
        load_config(path, ["objective.ra_gradient=upward"])
