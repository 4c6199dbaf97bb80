"""Hand-computed values for every base objective, every SoLoPO form and LongPO.

Expected numbers come from the formulas written out below with Python floats (module `math`), an
implementation independent of the torch code, plus analytic anchors (DPO at policy == reference is
ln 2, and so on).
"""

import math

import pytest
import torch

from megatron_solopo.objectives import longpo_loss, preference_loss, solopo_loss

LN2 = math.log(2.0)

# Two pairs. Response lengths differ between chosen and rejected so that length normalisation matters.
CHOSEN = [-10.0, -4.0]
REJECTED = [-12.0, -3.0]
REF_CHOSEN = [-11.0, -5.0]
REF_REJECTED = [-11.5, -2.0]
LONG_CHOSEN = [-13.0, -4.5]
REF_LONG_CHOSEN = [-12.0, -5.0]
LONG_REJECTED = [-12.5, -6.0]
REF_LONG_REJECTED = [-12.2, -2.5]
CHOSEN_TOKENS = [5, 4]
REJECTED_TOKENS = [6, 2]


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def tokens(values):
    return torch.tensor(values, dtype=torch.int64)


# ----------------------------------------------------------------- the formulas, in plain Python
def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def log_odds(avg_logp: float) -> float:
    return avg_logp - math.log(1.0 - math.exp(avg_logp))


def py_loss(name, hp, lw, ll, nw, nl, rw=None, rl=None):
    """Per-pair base loss."""
    if name == "dpo":
        z = (lw - rw) - (ll - rl)
        eps = hp.get("label_smoothing", 0.0)
        return -(1 - eps) * logsig(hp["beta"] * z) - eps * logsig(-hp["beta"] * z)
    if name == "ipo":
        z = (lw - rw) / nw - (ll - rl) / nl
        return (z - 1 / (2 * hp["beta"])) ** 2
    if name == "simpo":
        x = hp["beta"] * lw / nw - hp["beta"] * ll / nl - hp["gamma"]
        eps = hp.get("label_smoothing", 0.0)
        return -(1 - eps) * logsig(x) - eps * logsig(-x)
    if name == "orpo":
        return -lw / nw - hp["lam"] * logsig(log_odds(lw / nw) - log_odds(ll / nl))
    raise AssertionError(name)


def py_reward(name, hp, logp, n, ref=None):
    if name in ("dpo", "ipo"):
        return hp["beta"] * (logp - ref)
    if name == "simpo":
        return hp["beta"] * logp / n
    return log_odds(logp / n)


HPARAMS = {
    "dpo": {"beta": 0.1},
    "ipo": {"beta": 0.1},
    "simpo": {"beta": 2.0, "gamma": 1.0},
    "orpo": {"lam": 0.1},
}
USES_REF = {"dpo": True, "ipo": True, "simpo": False, "orpo": False}


def refs_for(name, *values):
    return [t(v) if USES_REF[name] else None for v in values]


# ----------------------------------------------------------------------------- base objectives
def test_literal_dpo_value():
    # z = (-10 + 11) - (-12 + 11.5) = 1.5; loss = log(1 + exp(-0.15)) = 0.620957...
    loss, _ = preference_loss("dpo", t([-10.0]), t([-12.0]), tokens([5]), tokens([6]), t([-11.0]), t([-11.5]))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.15)), abs=1e-12)
    assert loss.item() == pytest.approx(0.6209570478, abs=1e-9)  # ln(1 + 0.8607079764)


@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "orpo"])
def test_base_objective_matches_hand_formula(name):
    hp = HPARAMS[name]
    ref_c, ref_r = refs_for(name, REF_CHOSEN, REF_REJECTED)
    loss, metrics = preference_loss(
        name, t(CHOSEN), t(REJECTED), tokens(CHOSEN_TOKENS), tokens(REJECTED_TOKENS), ref_c, ref_r,
        reduction="none", **hp,
    )
    for i in range(2):
        expected = py_loss(name, hp, CHOSEN[i], REJECTED[i], CHOSEN_TOKENS[i], REJECTED_TOKENS[i],
                           REF_CHOSEN[i], REF_REJECTED[i])
        r_w = py_reward(name, hp, CHOSEN[i], CHOSEN_TOKENS[i], REF_CHOSEN[i])
        r_l = py_reward(name, hp, REJECTED[i], REJECTED_TOKENS[i], REF_REJECTED[i])
        assert loss[i].item() == pytest.approx(expected, rel=1e-12)
        assert metrics["loss/po"][i].item() == pytest.approx(expected, rel=1e-12)
        assert metrics["rewards/chosen"][i].item() == pytest.approx(r_w, rel=1e-12)
        assert metrics["rewards/rejected"][i].item() == pytest.approx(r_l, rel=1e-12)
        assert metrics["rewards/margin"][i].item() == pytest.approx(r_w - r_l, rel=1e-12, abs=1e-15)
        assert metrics["rewards/accuracy"][i].item() == float(r_w > r_l)


def test_orpo_components_sum_to_loss():
    loss, m = preference_loss("orpo", t(CHOSEN), t(REJECTED), tokens(CHOSEN_TOKENS), tokens(REJECTED_TOKENS),
                              lam=0.25, reduction="none")
    for i in range(2):
        nll = -CHOSEN[i] / CHOSEN_TOKENS[i]
        ratio = -0.25 * logsig(log_odds(CHOSEN[i] / CHOSEN_TOKENS[i]) - log_odds(REJECTED[i] / REJECTED_TOKENS[i]))
        assert m["loss/orpo_nll"][i].item() == pytest.approx(nll, rel=1e-12)
        assert m["loss/orpo_or"][i].item() == pytest.approx(ratio, rel=1e-12)
        assert loss[i].item() == pytest.approx(nll + ratio, rel=1e-12)
    assert torch.equal(m["orpo/clamped"], torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("name", ["dpo", "simpo"])
def test_label_smoothing(name):
    hp = {**HPARAMS[name], "label_smoothing": 0.2}
    ref_c, ref_r = refs_for(name, REF_CHOSEN, REF_REJECTED)
    loss, _ = preference_loss(name, t(CHOSEN), t(REJECTED), tokens(CHOSEN_TOKENS), tokens(REJECTED_TOKENS),
                              ref_c, ref_r, reduction="none", **hp)
    for i in range(2):
        expected = py_loss(name, hp, CHOSEN[i], REJECTED[i], CHOSEN_TOKENS[i], REJECTED_TOKENS[i],
                           REF_CHOSEN[i], REF_REJECTED[i])
        assert loss[i].item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "orpo"])
def test_sft_weight_adds_length_averaged_nll_of_chosen(name):
    hp = HPARAMS[name]
    ref_c, ref_r = refs_for(name, REF_CHOSEN, REF_REJECTED)
    args = (name, t(CHOSEN), t(REJECTED), tokens(CHOSEN_TOKENS), tokens(REJECTED_TOKENS), ref_c, ref_r)
    base, m0 = preference_loss(*args, reduction="none", **hp)
    with_sft, m = preference_loss(*args, reduction="none", sft_weight=0.5, **hp)
    expected_sft = [0.5 * -CHOSEN[i] / CHOSEN_TOKENS[i] for i in range(2)]
    assert m["loss/sft"].tolist() == pytest.approx(expected_sft, rel=1e-12)
    assert (with_sft - base).tolist() == pytest.approx(expected_sft, rel=1e-12)
    assert "loss/sft" not in m0


# --------------------------------------------------------------------------------- analytic anchors
def test_dpo_policy_equals_reference_is_ln2():
    logps = t([-3.0, -50.0, -1234.5])
    loss, m = preference_loss("dpo", logps, logps - 7.0, tokens([3, 9, 400]), tokens([4, 2, 1]),
                              logps.clone(), logps - 7.0)
    assert loss.item() == pytest.approx(LN2, abs=1e-14)
    assert m["rewards/margin"] == 0.0 and m["rewards/accuracy"] == 0.0


def test_ipo_at_target_margin_is_zero():
    # z' = (0 - (-1)) / 1 - 0 = 1 = 1 / (2 * 0.5)
    loss, _ = preference_loss("ipo", t([-2.0]), t([-5.0]), tokens([1]), tokens([1]), t([-3.0]), t([-5.0]), beta=0.5)
    assert loss.item() == pytest.approx(0.0, abs=1e-15)


def test_simpo_at_margin_gamma_is_ln2():
    # beta * (a_w - a_l) = 2 * (-1 - (-1.5)) = 1 = gamma
    loss, _ = preference_loss("simpo", t([-4.0]), t([-3.0]), tokens([4]), tokens([2]), beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx(LN2, abs=1e-14)


def test_orpo_equal_odds_is_nll_plus_lam_ln2():
    loss, _ = preference_loss("orpo", t([-6.0]), t([-3.0]), tokens([4]), tokens([2]), lam=0.3)
    assert loss.item() == pytest.approx(1.5 + 0.3 * LN2, abs=1e-14)


@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "orpo"])
def test_solo_with_long_equal_short_has_zero_distance(name):
    """SoLo-RA vanishes when the long context scores y_w exactly like the short one."""
    hp = HPARAMS[name]
    ref_sc, ref_sr, ref_lc = refs_for(name, REF_CHOSEN, REF_REJECTED, REF_CHOSEN)
    args = (t(CHOSEN), t(REJECTED), tokens(CHOSEN_TOKENS), tokens(REJECTED_TOKENS))
    solo, m = solopo_loss(name, t(CHOSEN), t(REJECTED), t(CHOSEN), tokens(CHOSEN_TOKENS), tokens(REJECTED_TOKENS),
                          ref_sc, ref_sr, ref_lc, alpha=3.0, **hp)
    base, _ = preference_loss(name, *args, ref_sc, ref_sr, **hp)
    assert m["ra/distance"] == 0.0 and m["loss/ra"] == 0.0
    assert solo.item() == pytest.approx(base.item(), rel=1e-14)


def test_solo_dpo_policy_equals_reference_everywhere_is_ln2():
    short, long = t([-5.0, -9.0]), t([-8.0, -20.0])
    loss, m = solopo_loss("dpo", short, short - 1, long, tokens([3, 3]), tokens([3, 3]),
                          short.clone(), short - 1, long.clone(), alpha=3.0)
    assert loss.item() == pytest.approx(LN2, abs=1e-14)
    assert m["ra/distance"] == 0.0


# ----------------------------------------------------------------------------------- SoLoPO forms
@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "orpo"])
@pytest.mark.parametrize("ra_distance", ["abs", "squared"])
@pytest.mark.parametrize("ra_on", ["chosen", "both"])
def test_solopo_matches_hand_formula(name, ra_distance, ra_on):
    hp = HPARAMS[name]
    alpha = 3.0
    ref_sc, ref_sr, ref_lc = refs_for(name, REF_CHOSEN, REF_REJECTED, REF_LONG_CHOSEN)
    extra = {}
    if ra_on == "both":
        extra["long_rejected_logps"] = t(LONG_REJECTED)
        extra["ref_long_rejected_logps"] = refs_for(name, REF_LONG_REJECTED)[0]
    loss, m = solopo_loss(
        name, t(CHOSEN), t(REJECTED), t(LONG_CHOSEN), tokens(CHOSEN_TOKENS), tokens(REJECTED_TOKENS),
        ref_sc, ref_sr, ref_lc, alpha=alpha, ra_distance=ra_distance, ra_on=ra_on, reduction="none",
        **extra, **hp,
    )
    s = (lambda d: d) if ra_distance == "abs" else (lambda d: d * d)
    for i in range(2):
        po = py_loss(name, hp, CHOSEN[i], REJECTED[i], CHOSEN_TOKENS[i], REJECTED_TOKENS[i],
                     REF_CHOSEN[i], REF_REJECTED[i])
        d_w = abs(py_reward(name, hp, CHOSEN[i], CHOSEN_TOKENS[i], REF_CHOSEN[i])
                  - py_reward(name, hp, LONG_CHOSEN[i], CHOSEN_TOKENS[i], REF_LONG_CHOSEN[i]))
        ra = s(d_w)
        if ra_on == "both":
            d_l = abs(py_reward(name, hp, REJECTED[i], REJECTED_TOKENS[i], REF_REJECTED[i])
                      - py_reward(name, hp, LONG_REJECTED[i], REJECTED_TOKENS[i], REF_LONG_REJECTED[i]))
            ra += s(d_l)
            assert m["ra/distance_rejected"][i].item() == pytest.approx(d_l, rel=1e-12)
        assert d_w > 0
        assert m["ra/distance"][i].item() == pytest.approx(d_w, rel=1e-12)
        assert m["loss/po"][i].item() == pytest.approx(po, rel=1e-12)
        assert m["loss/ra"][i].item() == pytest.approx(alpha * ra, rel=1e-12)
        assert loss[i].item() == pytest.approx(po + alpha * ra, rel=1e-12)
        assert m["rewards/long_chosen"][i].item() == pytest.approx(
            py_reward(name, hp, LONG_CHOSEN[i], CHOSEN_TOKENS[i], REF_LONG_CHOSEN[i]), rel=1e-12)
    assert ("ra/distance_rejected" in m) == (ra_on == "both")


def test_literal_solo_simpo_value():
    # short: a_w = -2, a_l = -3 -> PO = -logsig(2 * 1 - 1) = log(1 + e^-1); long a_w = -2.5 -> d = 2 * 0.5 = 1
    loss, m = solopo_loss("simpo", t([-8.0]), t([-6.0]), t([-10.0]), tokens([4]), tokens([2]), alpha=1.0)
    assert m["ra/distance"] == pytest.approx(1.0, abs=1e-14)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)) + 1.0, abs=1e-14)


def test_solo_sft_weight_is_on_short_chosen():
    _, m = solopo_loss("orpo", t(CHOSEN), t(REJECTED), t(LONG_CHOSEN), tokens(CHOSEN_TOKENS),
                       tokens(REJECTED_TOKENS), sft_weight=2.0, reduction="none")
    assert m["loss/sft"].tolist() == pytest.approx([2.0 * -CHOSEN[i] / CHOSEN_TOKENS[i] for i in range(2)])


# ------------------------------------------------------------------------------------------ LongPO
def test_longpo_matches_hand_formula():
    beta, nll_weight = 0.1, 0.5
    loss, m = longpo_loss(t(LONG_CHOSEN), t(LONG_REJECTED), tokens(CHOSEN_TOKENS), tokens(REJECTED_TOKENS),
                          t(REF_CHOSEN), t(REF_REJECTED), nll_weight=nll_weight, beta=beta, reduction="none")
    for i in range(2):
        z = (LONG_CHOSEN[i] - REF_CHOSEN[i]) - (LONG_REJECTED[i] - REF_REJECTED[i])
        po = -logsig(beta * z)
        nll = -LONG_CHOSEN[i] / CHOSEN_TOKENS[i]
        assert m["loss/po"][i].item() == pytest.approx(po, rel=1e-12)
        assert m["loss/nll"][i].item() == pytest.approx(nll_weight * nll, rel=1e-12)
        assert loss[i].item() == pytest.approx(po + nll_weight * nll, rel=1e-12)
        assert m["rewards/chosen"][i].item() == pytest.approx(beta * (LONG_CHOSEN[i] - REF_CHOSEN[i]), rel=1e-12)


def test_longpo_default_nll_weight_is_001():
    loss, m = longpo_loss(t([-4.0]), t([-4.0]), tokens([2]), tokens([2]), t([-4.0]), t([-4.0]))
    assert loss.item() == pytest.approx(LN2 + 0.01 * 2.0, abs=1e-14)


# ---------------------------------------------------------------------------------- reductions
def _all_calls():
    base = (t(CHOSEN), t(REJECTED), tokens(CHOSEN_TOKENS), tokens(REJECTED_TOKENS))
    return {
        "dpo": lambda r: preference_loss("dpo", *base, t(REF_CHOSEN), t(REF_REJECTED), reduction=r),
        "orpo": lambda r: preference_loss("orpo", *base, reduction=r, sft_weight=0.1),
        "solo-ipo-both": lambda r: solopo_loss(
            "ipo", t(CHOSEN), t(REJECTED), t(LONG_CHOSEN), tokens(CHOSEN_TOKENS), tokens(REJECTED_TOKENS),
            t(REF_CHOSEN), t(REF_REJECTED), t(REF_LONG_CHOSEN), t(LONG_REJECTED), t(REF_LONG_REJECTED),
            ra_on="both", reduction=r),
        "solo-orpo": lambda r: solopo_loss(
            "orpo", torch.tensor([-1e-9, -4.0], dtype=torch.float64), t(REJECTED), t([0.0, -4.5]),
            tokens(CHOSEN_TOKENS), tokens(REJECTED_TOKENS), reduction=r),
        "longpo": lambda r: longpo_loss(t(LONG_CHOSEN), t(LONG_REJECTED), tokens(CHOSEN_TOKENS),
                                        tokens(REJECTED_TOKENS), t(REF_CHOSEN), t(REF_REJECTED), reduction=r),
    }


@pytest.mark.parametrize("call", sorted(_all_calls()))
def test_reductions_are_consistent(call):
    fn = _all_calls()[call]
    loss_none, m_none = fn("none")
    loss_sum, m_sum = fn("sum")
    loss_mean, m_mean = fn("mean")
    assert loss_none.shape == (2,) and loss_sum.dim() == 0 and loss_mean.dim() == 0
    assert loss_sum.item() == pytest.approx(loss_none.sum().item(), rel=1e-14)
    assert loss_mean.item() == pytest.approx(loss_none.mean().item(), rel=1e-14)
    assert set(m_none) == set(m_sum) == set(m_mean)
    for key, per_pair in m_none.items():
        assert per_pair.shape == (2,) and not per_pair.requires_grad
        assert isinstance(m_sum[key], torch.Tensor) and m_sum[key].dim() == 0
        assert m_sum[key].item() == pytest.approx(per_pair.sum().item(), rel=1e-14)
        assert isinstance(m_mean[key], float)
        expected_mean = per_pair.sum().item() if key == "orpo/clamped" else per_pair.mean().item()
        assert m_mean[key] == pytest.approx(expected_mean, rel=1e-14)


def test_orpo_clamp_count_in_solo():
    # short chosen a = -2.5e-10 and long chosen a = 0 are clamped: 2 clamps in pair 0, none in pair 1.
    _, m = _all_calls()["solo-orpo"]("none")
    assert m["orpo/clamped"].tolist() == [2.0, 0.0]
    _, m_mean = _all_calls()["solo-orpo"]("mean")
    assert m_mean["orpo/clamped"] == 2.0


def test_loss_components_add_up():
    for name, fn in _all_calls().items():
        loss, m = fn("none")
        parts = sum(m[k] for k in ("loss/po", "loss/sft", "loss/ra", "loss/nll") if k in m)
        assert torch.allclose(loss.detach(), parts, rtol=1e-14), name


def test_required_metric_names_present():
    for name, fn in _all_calls().items():
        _, m = fn("mean")
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "loss/po"):
            assert key in m, (name, key)
        if name.startswith("solo"):
            assert "ra/distance" in m and "loss/ra" in m
        if "orpo" in name:
            assert "orpo/clamped" in m


def test_float32_inputs_give_float32_loss_and_bf16_is_upcast():
    f32 = torch.tensor(CHOSEN), torch.tensor(REJECTED)
    loss, _ = preference_loss("simpo", *f32, tokens(CHOSEN_TOKENS), tokens(REJECTED_TOKENS))
    assert loss.dtype == torch.float32
    bf16 = tuple(x.to(torch.bfloat16) for x in f32)
    loss16, _ = preference_loss("simpo", *bf16, tokens(CHOSEN_TOKENS), tokens(REJECTED_TOKENS))
    assert loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss.item(), rel=1e-6)  # these values are exact in bf16


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "orpo"])
def test_cuda_matches_cpu(name):
    hp = HPARAMS[name]
    ref_sc, ref_sr, ref_lc = refs_for(name, REF_CHOSEN, REF_REJECTED, REF_LONG_CHOSEN)
    args = [t(CHOSEN), t(REJECTED), t(LONG_CHOSEN), tokens(CHOSEN_TOKENS), tokens(REJECTED_TOKENS),
            ref_sc, ref_sr, ref_lc]
    cpu_loss, cpu_m = solopo_loss(name, *args, reduction="sum", **hp)
    cuda_args = [None if a is None else a.float().cuda() for a in args]
    cuda_loss, cuda_m = solopo_loss(name, *cuda_args, reduction="sum", **hp)
    assert cuda_loss.device.type == "cuda" and cuda_loss.dtype == torch.float32
    assert cuda_loss.item() == pytest.approx(cpu_loss.item(), rel=1e-5)
    assert all(v.device.type == "cuda" for v in cuda_m.values())
