"""Parity with TRL's loss functions on identical random inputs (skipped when trl is not installed).

TRL's ORPO and CPO/SimPO losses are methods that only read a few attributes of `self`, so they are
called unbound with a SimpleNamespace. TRL (checked with 1.16) has no standalone DPO loss function: it
lives inside DPOTrainer._compute_loss, which needs a model. The DPO and IPO *formulas* are checked
against CPOTrainer.cpo_loss ("sigmoid" and "ipo" loss types), which applies exactly DPO's
(label-smoothed) sigmoid loss / IPO's squared loss to whatever log-ratios it is given: feeding it
policy-minus-reference log-ratios (length-averaged for IPO, as TRL's DPOTrainer does) gives DPO / IPO.
"""

import os
import types

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")
orpo_module = pytest.importorskip("trl.experimental.orpo")
cpo_module = pytest.importorskip("trl.experimental.cpo")

from megatron_solopo.objectives import preference_loss  # noqa: E402

B = 32
CPU = types.SimpleNamespace(device=torch.device("cpu"))


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    chosen_tokens = torch.randint(1, 200, (B,), generator=g)
    rejected_tokens = torch.randint(1, 200, (B,), generator=g)
    # per-token log-probs in (-3, -0.001): realistic sums, averages close to 0 included
    chosen = -(torch.rand(B, generator=g) * 3 + 1e-3) * chosen_tokens
    rejected = -(torch.rand(B, generator=g) * 3 + 1e-3) * rejected_tokens
    ref_chosen = chosen + torch.randn(B, generator=g) * 5
    ref_rejected = rejected + torch.randn(B, generator=g) * 5
    return chosen, rejected, chosen_tokens, rejected_tokens, ref_chosen, ref_rejected


def _cpo_self(loss_type, beta, label_smoothing=0.0, simpo_gamma=None):
    attrs = dict(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, alpha=0.0, accelerator=CPU)
    if simpo_gamma is not None:
        attrs["simpo_gamma"] = simpo_gamma
    return types.SimpleNamespace(**attrs)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_orpo_matches_trl(seed, lam):
    chosen, rejected, n_w, n_l, _, _ = _inputs(seed)
    avg_w, avg_l = chosen / n_w, rejected / n_l
    trl_self = types.SimpleNamespace(beta=lam, accelerator=CPU)  # TRL's ORPO beta is the paper's lambda
    trl_losses, _, _, _, trl_mean_log_odds = orpo_module.ORPOTrainer.odds_ratio_loss(trl_self, avg_w, avg_l)
    loss, m = preference_loss("orpo", chosen, rejected, n_w, n_l, lam=lam, reduction="none")
    # TRL returns +lam*logsig(log odds ratio) and subtracts it from the NLL (-mean logp of the chosen)
    torch.testing.assert_close(m["loss/orpo_or"], -trl_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, -avg_w - trl_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["rewards/margin"].mean(), trl_mean_log_odds, rtol=1e-5, atol=1e-5)
    assert m["orpo/clamped"].sum() == 0


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta, gamma, label_smoothing", [(2.0, 1.0, 0.0), (2.5, 0.5, 0.1), (10.0, 3.0, 0.0)])
def test_simpo_matches_trl_cpo_simpo(seed, beta, gamma, label_smoothing):
    chosen, rejected, n_w, n_l, _, _ = _inputs(seed)
    trl_self = _cpo_self("simpo", beta, label_smoothing, simpo_gamma=gamma)  # simpo_gamma: absolute margin
    trl_losses, trl_chosen_rewards, trl_rejected_rewards = cpo_module.CPOTrainer.cpo_loss(
        trl_self, chosen / n_w, rejected / n_l
    )
    loss, m = preference_loss("simpo", chosen, rejected, n_w, n_l, beta=beta, gamma=gamma,
                              label_smoothing=label_smoothing, reduction="none")
    torch.testing.assert_close(loss, trl_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["rewards/chosen"], trl_chosen_rewards, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["rewards/rejected"], trl_rejected_rewards, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta, label_smoothing", [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_matches_trl_sigmoid_loss(seed, beta, label_smoothing):
    chosen, rejected, n_w, n_l, ref_w, ref_l = _inputs(seed)
    trl_self = _cpo_self("sigmoid", beta, label_smoothing)
    trl_losses, trl_chosen_rewards, trl_rejected_rewards = cpo_module.CPOTrainer.cpo_loss(
        trl_self, chosen - ref_w, rejected - ref_l
    )
    loss, m = preference_loss("dpo", chosen, rejected, n_w, n_l, ref_w, ref_l, beta=beta,
                              label_smoothing=label_smoothing, reduction="none")
    torch.testing.assert_close(loss, trl_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["rewards/chosen"], trl_chosen_rewards, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m["rewards/rejected"], trl_rejected_rewards, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_ipo_matches_trl_ipo_loss(seed, beta):
    chosen, rejected, n_w, n_l, ref_w, ref_l = _inputs(seed)
    trl_losses, _, _ = cpo_module.CPOTrainer.cpo_loss(
        _cpo_self("ipo", beta), (chosen - ref_w) / n_w, (rejected - ref_l) / n_l
    )
    loss, _ = preference_loss("ipo", chosen, rejected, n_w, n_l, ref_w, ref_l, beta=beta, reduction="none")
    torch.testing.assert_close(loss, trl_losses, rtol=1e-5, atol=1e-5)

