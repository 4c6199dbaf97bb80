"""Every input-validation error path, and plugging a new objective into the registry."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_solopo.objectives import (
    HParam,
    ObjectiveConfig,
    PreferenceObjective,
    get_objective,
    longpo_loss,
    objective_loss,
    preference_loss,
    register_objective,
    registered_objectives,
    required_reference_sequences,
    required_sequences,
    solopo_loss,
    unregister_objective,
)


def lp(*values):
    return torch.tensor(values or (-3.0, -4.0), dtype=torch.float64)


N = torch.tensor([2, 3])


def dpo_args(**overrides):
    args = dict(name="dpo", chosen_logps=lp(), rejected_logps=lp(), chosen_tokens=N, rejected_tokens=N,
                ref_chosen_logps=lp(), ref_rejected_logps=lp())
    args.update(overrides)
    return args


def solo_args(name="dpo", **overrides):
    args = dict(name=name, short_chosen_logps=lp(), short_rejected_logps=lp(), long_chosen_logps=lp(),
                chosen_tokens=N, rejected_tokens=N)
    if name in ("dpo", "ipo"):
        args.update(ref_short_chosen_logps=lp(), ref_short_rejected_logps=lp(), ref_long_chosen_logps=lp())
    args.update(overrides)
    return args


def test_valid_calls_pass():
    preference_loss(**dpo_args())
    solopo_loss(**solo_args())
    solopo_loss(**solo_args("orpo"))


# ------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("fn, args", [(preference_loss, dpo_args), (solopo_loss, solo_args)])
def test_unknown_name(fn, args):
    with pytest.raises(ValueError, match=r"unknown preference objective 'kto'.*dpo.*orpo"):
        fn(**args(name="kto"))


# ------------------------------------------------------------------------------------ references
@pytest.mark.parametrize("name", ["dpo", "ipo"])
@pytest.mark.parametrize("missing", ["ref_chosen_logps", "ref_rejected_logps"])
def test_missing_reference(name, missing):
    with pytest.raises(ValueError, match=rf"needs reference-model log-probs; missing \['{missing}'\]"):
        preference_loss(**dpo_args(name=name, **{missing: None}))


@pytest.mark.parametrize("name", ["dpo", "ipo"])
@pytest.mark.parametrize("missing", ["ref_short_chosen_logps", "ref_short_rejected_logps", "ref_long_chosen_logps"])
def test_solo_missing_reference(name, missing):
    with pytest.raises(ValueError, match=rf"missing \['{missing}'\]"):
        solopo_loss(**solo_args(name, **{missing: None}))


def test_solo_both_needs_long_rejected_and_its_reference():
    with pytest.raises(ValueError, match="pass long_rejected_logps"):
        solopo_loss(**solo_args("dpo", ra_on="both"))
    with pytest.raises(ValueError, match=r"missing \['ref_long_rejected_logps'\]"):
        solopo_loss(**solo_args("dpo", ra_on="both", long_rejected_logps=lp()))
    solopo_loss(**solo_args("dpo", ra_on="both", long_rejected_logps=lp(), ref_long_rejected_logps=lp()))


@pytest.mark.parametrize("given", ["long_rejected_logps", "ref_long_rejected_logps"])
def test_solo_chosen_only_rejects_long_rejected(given):
    with pytest.raises(ValueError, match="ra_on='chosen'"):
        solopo_loss(**solo_args("dpo", **{given: lp()}))


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_reference_passed_to_reference_free(name):
    with pytest.raises(ValueError, match=rf"'{name}' is reference-free but got \['ref_chosen_logps'\]"):
        preference_loss(name, lp(), lp(), N, N, ref_chosen_logps=lp())
    with pytest.raises(ValueError, match="reference-free"):
        solopo_loss(**solo_args(name, ref_long_chosen_logps=lp()))


def test_longpo_references_required():
    with pytest.raises(ValueError, match=r"missing \['ref_short_rejected_logps'\]"):
        longpo_loss(lp(), lp(), N, N, lp(), None)


# ------------------------------------------------------------------------------- token counts
@pytest.mark.parametrize("bad", [[0, 3], [2, -1], [2.0, math.nan], [2.0, math.inf]])
@pytest.mark.parametrize("which", ["chosen_tokens", "rejected_tokens"])
def test_non_positive_or_non_finite_token_counts(bad, which):
    with pytest.raises(ValueError, match=rf"{which} must be finite and > 0"):
        preference_loss(**dpo_args(**{which: torch.tensor(bad)}))


def test_bool_token_counts():
    with pytest.raises(TypeError, match="token counts"):
        preference_loss(**dpo_args(chosen_tokens=torch.tensor([True, True])))


# ------------------------------------------------------------------------------- NaN / inf / types
@pytest.mark.parametrize("which", ["chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"])
@pytest.mark.parametrize("bad", [math.nan, -math.inf])
def test_non_finite_logps(which, bad):
    with pytest.raises(ValueError, match=rf"{which} contains NaN or inf"):
        preference_loss(**dpo_args(**{which: lp(-1.0, bad)}))


@pytest.mark.parametrize("which", ["short_chosen_logps", "short_rejected_logps", "long_chosen_logps"])
def test_solo_nan(which):
    with pytest.raises(ValueError, match=rf"{which} contains NaN"):
        solopo_loss(**solo_args("orpo", **{which: lp(math.nan, -1.0)}))


def test_longpo_nan():
    with pytest.raises(ValueError, match="long_chosen_logps contains NaN"):
        longpo_loss(lp(math.nan, -1.0), lp(), N, N, lp(), lp())


def test_non_tensor_and_integer_logps():
    with pytest.raises(TypeError, match="chosen_logps must be a torch.Tensor"):
        preference_loss(**dpo_args(chosen_logps=[-1.0, -2.0]))
    with pytest.raises(TypeError, match="floating-point"):
        preference_loss(**dpo_args(chosen_logps=torch.tensor([-1, -2])))


# ------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("which, value", [
    ("rejected_logps", lp(-1.0, -2.0, -3.0)),
    ("ref_rejected_logps", lp(-1.0)),
    ("chosen_tokens", torch.tensor([1, 2, 3])),
    ("chosen_logps", lp().reshape(2, 1)),
])
def test_shape_mismatch(which, value):
    with pytest.raises(ValueError, match=rf"shape mismatch: {which} has shape"):
        preference_loss(**dpo_args(**{which: value}))


def test_solo_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch: long_chosen_logps"):
        solopo_loss(**solo_args("simpo", long_chosen_logps=lp(-1.0)))


def test_empty_batch():
    empty = torch.zeros(0, dtype=torch.float64)
    with pytest.raises(ValueError, match="empty batch"):
        preference_loss("orpo", empty, empty, torch.zeros(0), torch.zeros(0))


# ------------------------------------------------------------------------------ hyperparameters
@pytest.mark.parametrize("name, hparam", [("dpo", "gamma"), ("dpo", "lam"), ("orpo", "beta"),
                                          ("ipo", "label_smoothing"), ("simpo", "lam"), ("dpo", "alpha"),
                                          ("dpo", "bogus")])
def test_hparam_not_used_by_objective(name, hparam):
    args = dpo_args(name=name) if name in ("dpo", "ipo") else dpo_args(name=name, ref_chosen_logps=None,
                                                                        ref_rejected_logps=None)
    with pytest.raises(ValueError, match=rf"unknown hyperparameter\(s\) \['{hparam}'\]"):
        preference_loss(**args, **{hparam: 0.1})


@pytest.mark.parametrize("hparam, value", [("beta", 0.0), ("beta", -1.0), ("label_smoothing", 0.5),
                                           ("label_smoothing", -0.1), ("sft_weight", -1.0), ("beta", math.nan),
                                           ("beta", math.inf)])
def test_hparam_out_of_range(hparam, value):
    with pytest.raises(ValueError, match=rf"{hparam}=.* is outside its allowed range"):
        preference_loss(**dpo_args(), **{hparam: value})


@pytest.mark.parametrize("value", [True, "0.1", None, torch.tensor(0.1)])
def test_hparam_wrong_type(value):
    with pytest.raises(TypeError, match="must be a real number"):
        preference_loss(**dpo_args(), beta=value)


def test_orpo_lam_negative():
    with pytest.raises(ValueError, match="lam=-0.1"):
        preference_loss("orpo", lp(), lp(), N, N, lam=-0.1)


def test_bad_reduction_ra_distance_ra_on_alpha():
    with pytest.raises(ValueError, match="reduction='avg'"):
        preference_loss(**dpo_args(), reduction="avg")
    with pytest.raises(ValueError, match="ra_distance='l2'"):
        solopo_loss(**solo_args(), ra_distance="l2")
    with pytest.raises(ValueError, match="ra_on='rejected'"):
        solopo_loss(**solo_args(), ra_on="rejected")
    with pytest.raises(ValueError, match="alpha=-1"):
        solopo_loss(**solo_args(), alpha=-1.0)
    with pytest.raises(ValueError, match="reduction='avg'"):
        longpo_loss(lp(), lp(), N, N, lp(), lp(), reduction="avg")


def test_longpo_rejects_sft_weight_and_foreign_hparams():
    with pytest.raises(ValueError, match="nll_weight"):
        longpo_loss(lp(), lp(), N, N, lp(), lp(), sft_weight=0.1)
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['gamma'\]"):
        longpo_loss(lp(), lp(), N, N, lp(), lp(), gamma=1.0)
    with pytest.raises(ValueError, match="nll_weight=-1"):
        longpo_loss(lp(), lp(), N, N, lp(), lp(), nll_weight=-1.0)


# ------------------------------------------------------------------------------------ registry
def test_registry_lists_the_four_base_objectives():
    assert {"dpo", "ipo", "simpo", "orpo"} <= set(registered_objectives())
    assert get_objective("dpo").needs_reference and not get_objective("orpo").needs_reference


def test_registry_rejects_duplicates_and_bad_objectives():
    with pytest.raises(ValueError, match="already registered"):
        register_objective(get_objective("dpo"))
    with pytest.raises(TypeError, match="PreferenceObjective"):
        register_objective(lambda: None)
    with pytest.raises(ValueError, match="no objective named"):
        unregister_objective("not-there")
    with pytest.raises(ValueError, match="lower-case identifier"):
        PreferenceObjective(name="My Loss", pair_loss=len, reward=len, needs_reference=False)


@pytest.fixture
def hinge_objective():
    """A new reference-free objective defined only by its loss and reward (SLiC-style hinge)."""

    def pair_loss(chosen, rejected, hp):
        return F.relu(hp["delta"] - hp["beta"] * (chosen.mean_logps - rejected.mean_logps)), {}

    def reward(seq, hp):
        return hp["beta"] * seq.mean_logps

    objective = PreferenceObjective(
        name="hinge",
        pair_loss=pair_loss,
        reward=reward,
        needs_reference=False,
        hparams={"beta": HParam(1.0, "scale", low=0.0, low_open=True), "delta": HParam(1.0, "margin", low=0.0)},
    )
    register_objective(objective)
    yield objective
    unregister_objective("hinge")


def test_plugged_in_objective_works_everywhere(hinge_objective):
    assert "hinge" in registered_objectives()
    # pair 0: a_w = -1, a_l = -2 -> relu(1 - 0.5 * 1) = 0.5; pair 1: a_w = -1, a_l = -5 -> relu(1 - 2) = 0
    chosen, rejected, n = lp(-2.0, -2.0), lp(-4.0, -10.0), torch.tensor([2, 2])
    loss, m = preference_loss("hinge", chosen, rejected, n, n, beta=0.5, reduction="none")
    assert loss.tolist() == pytest.approx([0.5, 0.0])
    assert m["rewards/chosen"].tolist() == pytest.approx([-0.5, -0.5])
    # SoLo form: long chosen a = -3 -> |(-0.5) - (-1.5)| = 1 per pair; alpha 2
    loss, m = solopo_loss("hinge", chosen, rejected, lp(-6.0, -6.0), n, n, alpha=2.0, beta=0.5, reduction="none")
    assert m["ra/distance"].tolist() == pytest.approx([1.0, 1.0])
    assert loss.tolist() == pytest.approx([2.5, 2.0])
    with pytest.raises(ValueError, match="reference-free"):
        preference_loss("hinge", chosen, rejected, n, n, ref_chosen_logps=chosen)
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['gamma'\]"):
        preference_loss("hinge", chosen, rejected, n, n, gamma=1.0)
    config = ObjectiveConfig(name="hinge", mode="solo", beta=0.5)
    assert config.resolved_hparams == {"beta": 0.5, "delta": 1.0, "sft_weight": 0.0, "alpha": 1.0,
                                       "ra_distance": "abs", "ra_on": "chosen", "ra_gradient": "both"}
    assert required_reference_sequences(config) == frozenset()
    assert required_sequences(config) == {"short_chosen", "short_rejected", "long_chosen"}
    # its own hyperparameter comes from the config's open `hparams` mapping, validated once, here
    config = ObjectiveConfig(name="hinge", mode="short", hparams={"delta": 2.0})
    assert config.resolved_hparams == {"beta": 1.0, "delta": 2.0, "sft_weight": 0.0}
    with pytest.raises(ValueError, match=r"objective.hparams.gamma=1.0 is not a hyperparameter of 'hinge' "
                                         r"\(used by: \['simpo'\]\); 'hinge' accepts \['beta', 'delta'\]"):
        ObjectiveConfig(name="hinge", hparams={"gamma": 1.0})
    with pytest.raises(ValueError, match="outside its allowed range"):
        ObjectiveConfig(name="hinge", hparams={"delta": -1.0})
    with pytest.raises(ValueError, match="objective.beta and objective.hparams.beta are both set"):
        ObjectiveConfig(name="hinge", beta=0.5, hparams={"beta": 0.5})
    loss, _ = objective_loss(config, {"short_chosen_logps": chosen, "short_rejected_logps": rejected,
                                      "chosen_tokens": n, "rejected_tokens": n}, reduction="none")
    # delta 2, beta 1: relu(2 - 1) = 1 and relu(2 - 4) = 0
    assert loss.tolist() == pytest.approx([1.0, 0.0])


@pytest.mark.parametrize("name", ["sft_weight", "alpha", "nll_weight", "reduction", "not an identifier"])
def test_objectives_cannot_declare_reserved_hyperparameters(name):
    with pytest.raises(ValueError, match="must be an identifier other than"):
        PreferenceObjective(name="bad", pair_loss=lambda c, r, h: (c.logps, {}), reward=lambda s, h: s.logps,
                            needs_reference=False, hparams={name: HParam(1.0, "x")})


def test_unregistered_objective_is_gone(hinge_objective):
    unregister_objective("hinge")
    try:
        with pytest.raises(ValueError, match="unknown preference objective 'hinge'"):
            preference_loss("hinge", lp(), lp(), N, N)
    finally:
        register_objective(hinge_objective)


def test_device_mismatch():
    with pytest.raises(ValueError, match="ref_rejected_logps is on meta but chosen_logps is on cpu"):
        preference_loss(**dpo_args(ref_rejected_logps=torch.empty(2, dtype=torch.float64, device="meta")))
