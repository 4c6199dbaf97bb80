"""Eval statistics against hand-computed values (eval/stats.py)."""

import math

import pytest

from megatron_solopo.eval.stats import (
    bootstrap_ci,
    mcnemar_exact,
    mcnemar_items_needed,
    mdd_mcnemar,
    mdd_two_proportions,
    paired_bootstrap,
)


def test_mcnemar_exact_matches_the_binomial_by_hand():
    # a right only on item 0, b right only on items 1..6: 7 discordant, split 1 / 6
    a = [1, 0, 0, 0, 0, 0, 0, 1, 0]
    b = [0, 1, 1, 1, 1, 1, 1, 1, 0]
    result = mcnemar_exact(a, b)
    assert (result["only_a"], result["only_b"], result["n"]) == (1, 6, 9)
    # P(X <= 1 | n=7, 1/2) = (1 + 7) / 128; two-sided doubles it
    assert result["p_value"] == pytest.approx(2 * 8 / 128)
    assert mcnemar_exact([0] * 5, [1] * 5)["p_value"] == pytest.approx(2 / 32)


def test_mcnemar_without_discordant_items_is_one_and_symmetric():
    assert mcnemar_exact([1, 0, 1], [1, 0, 1])["p_value"] == 1.0
    a, b = [1, 1, 0, 0, 1], [0, 1, 1, 0, 0]
    assert mcnemar_exact(a, b)["p_value"] == mcnemar_exact(b, a)["p_value"]
    assert mcnemar_exact([1, 0], [0, 1])["p_value"] == 1.0  # capped at 1


def test_bootstrap_ci_by_hand():
    # resampled means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    ci = bootstrap_ci([0, 1], n_resamples=20_000, seed=1)
    assert (ci["mean"], ci["lo"], ci["hi"], ci["n"]) == (0.5, 0.0, 1.0, 2)
    assert bootstrap_ci([1, 1, 1]) == {"mean": 1.0, "lo": 1.0, "hi": 1.0, "n": 3}
    # a larger sample: the CI brackets the mean and has the normal-approximation width
    scores = [1] * 30 + [0] * 70
    ci = bootstrap_ci(scores, seed=0)
    half_width = 1.96 * math.sqrt(0.3 * 0.7 / 100)
    assert ci["lo"] < 0.3 < ci["hi"]
    assert (ci["hi"] - ci["lo"]) / 2 == pytest.approx(half_width, rel=0.15)


def test_bootstrap_is_deterministic_per_seed():
    scores = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1]
    assert bootstrap_ci(scores, seed=3) == bootstrap_ci(scores, seed=3)


def test_paired_bootstrap_by_hand():
    same = paired_bootstrap([1, 0, 1, 0.5], [1, 0, 1, 0.5])
    assert (same["diff"], same["lo"], same["hi"], same["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    better = paired_bootstrap([0] * 10, [1] * 10)
    assert (better["diff"], better["lo"], better["hi"], better["p_value"]) == (1.0, 1.0, 1.0, 0.0)
    # b better on 2 of 40 items only: not significant; the sign follows b - a
    a = [0.0] * 40
    b = [1.0, 1.0] + [0.0] * 38
    result = paired_bootstrap(a, b, seed=0)
    assert result["diff"] == pytest.approx(0.05)
    assert result["lo"] <= 0.0 < result["hi"]
    assert result["p_value"] > 0.05
    assert paired_bootstrap(b, a, seed=0)["diff"] == pytest.approx(-0.05)


def test_minimum_detectable_differences_by_hand():
    # (z_0.975 + z_0.8) * sqrt(2 * 0.25 / 100) = 2.801585 * 0.0707107
    assert mdd_two_proportions(100) == pytest.approx(0.198100, abs=1e-5)
    assert mdd_two_proportions(400) == pytest.approx(0.198100 / 2, abs=1e-5)
    # Connor 1987 at psi = 0.2, d = 0.1: n = (1.959964 * sqrt(0.2) + 0.841621 * sqrt(0.19))^2 / 0.01 = 154.6
    assert 0.099 < mdd_mcnemar(155, 0.2) < 0.1 < mdd_mcnemar(154, 0.2) < 0.101
    # tiny samples cannot detect anything below the discordant share
    assert mdd_mcnemar(3, 0.2) == 0.2


@pytest.mark.parametrize("bad", [[], [0.5, 2.0], [float("nan")], [[0, 1]]])
def test_bad_scores_are_rejected_with_a_message(bad):
    with pytest.raises(ValueError, match="scores"):
        bootstrap_ci(bad)


def test_paired_functions_need_aligned_items():
    with pytest.raises(ValueError, match="same items"):
        mcnemar_exact([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact([0.5, 1], [1, 0])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap([1], [1], confidence=1.5)


def test_mcnemar_items_needed_inverts_the_detectable_difference():
    # by hand, psi 0.2, d 0.1: (1.95996 * 0.44721 + 0.84162 * 0.43589)^2 / 0.01 = 154.6 -> 155 items
    assert mcnemar_items_needed(0.1, 0.2) == 155
    for psi in (0.15, 0.3, 0.5):
        n = mcnemar_items_needed(0.1, psi)
        assert mdd_mcnemar(n, psi) <= 0.1 < mdd_mcnemar(n - 1, psi)
    assert mcnemar_items_needed(0.1, 0.3, power=0.9) > mcnemar_items_needed(0.1, 0.3)
    with pytest.raises(ValueError, match="only discordant items can differ"):
        mcnemar_items_needed(0.3, 0.2)
