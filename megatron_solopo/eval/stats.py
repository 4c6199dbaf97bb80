"""Uncertainty of evaluation scores: bootstrap confidence intervals, paired tests, detectable differences.

An eval cell (suite x length x depth) holds a few dozen to a few hundred 0/1 scores, so a difference
between two models means something only with its uncertainty. Everything here works on per-item
scores in [0, 1] (sub-EM, EM, F1), aligned by item for the paired functions (the same questions,
rendered the same way, for both models), and returns fractions in [0, 1] (reports print percent).

- `bootstrap_ci`: percentile bootstrap of the mean (Efron & Tibshirani 1993, ch. 13).
- `mcnemar_exact`: exact two-sided McNemar test for paired 0/1 scores (binomial test on the
  discordant items; no continuity approximation, so it is valid for the small cells we have).
- `paired_bootstrap`: mean difference b - a with a bootstrap CI and two-sided p-value, resampling
  items (keeps the pairing; works for F1 as well as 0/1 scores).
- `mdd_two_proportions` / `mdd_mcnemar`: the smallest true difference the sample size detects with
  the given power at the given level, to state what a "no significant difference" can rule out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

__all__ = ["bootstrap_ci", "mcnemar_exact", "paired_bootstrap", "mdd_two_proportions", "mdd_mcnemar",
           "mcnemar_items_needed"]

DEFAULT_RESAMPLES = 10_000


def _scores(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D sequence of per-item scores, got shape {array.shape}")
    if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0:
        raise ValueError(f"{name}: per-item scores must be finite and in [0, 1]")
    return array


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a_scores, b_scores = _scores(a, "a"), _scores(b, "b")
    if a_scores.shape != b_scores.shape:
        raise ValueError(f"paired scores need the same items in the same order: {a_scores.size} vs {b_scores.size}")
    return a_scores, b_scores


def _check_level(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _resampled_means(values: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of `n_resamples` resamples (with replacement, same size) of `values`: [n_resamples]."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, values.size, size=(n_resamples, values.size))  # [R, n]
    return values[index].mean(axis=1)


def bootstrap_ci(scores: Sequence[float], confidence: float = 0.95, n_resamples: int = DEFAULT_RESAMPLES,
                 seed: int = 0) -> dict[str, float]:
    """Mean of per-item scores with a percentile-bootstrap CI: {"mean", "lo", "hi", "n"}."""
    _check_level(confidence)
    values = _scores(scores, "scores")
    means = _resampled_means(values, n_resamples, seed)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return {"mean": float(values.mean()), "lo": float(lo), "hi": float(hi), "n": int(values.size)}


def _binomial_cdf_half(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exactly."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Exact two-sided McNemar test that models a and b are equally often right on the same items.

    a, b: 0/1 scores per item (same items, same order). Only discordant items count: `only_a` (a right,
    b wrong) and `only_b`; under the null each discordant item goes either way with probability 1/2,
    so p = min(1, 2 * P(Binomial(only_a + only_b, 1/2) <= min(only_a, only_b))).
    """
    a_scores, b_scores = _paired(a, b)
    if not (np.isin(a_scores, (0.0, 1.0)).all() and np.isin(b_scores, (0.0, 1.0)).all()):
        raise ValueError("mcnemar_exact needs 0/1 scores (sub-EM, EM); use paired_bootstrap for F1")
    only_a = int(np.sum((a_scores == 1.0) & (b_scores == 0.0)))
    only_b = int(np.sum((a_scores == 0.0) & (b_scores == 1.0)))
    discordant = only_a + only_b
    p_value = 1.0 if discordant == 0 else min(1.0, 2.0 * _binomial_cdf_half(min(only_a, only_b), discordant))
    return {"only_a": only_a, "only_b": only_b, "n": int(a_scores.size), "p_value": p_value}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], confidence: float = 0.95,
                     n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, float]:
    """Mean difference b - a over the same items, with a bootstrap CI and a two-sided p-value.

    Items are resampled with their pair of scores. The p-value is twice the smaller share of resampled
    differences on either side of zero (ties at zero count half to each side), capped at 1.
    """
    _check_level(confidence)
    a_scores, b_scores = _paired(a, b)
    diffs = b_scores - a_scores  # [n], in [-1, 1]
    means = _resampled_means(diffs, n_resamples, seed)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    below = float(np.mean(means < 0.0) + 0.5 * np.mean(means == 0.0))
    p_value = min(1.0, 2.0 * min(below, 1.0 - below))
    return {"diff": float(diffs.mean()), "lo": float(lo), "hi": float(hi), "n": int(diffs.size), "p_value": p_value}


def _z(probability: float) -> float:
    return NormalDist().inv_cdf(probability)


def mdd_two_proportions(n_per_arm: int, base_rate: float = 0.5, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest difference of two accuracies (independent samples of n each) that a two-sided test at
    level `alpha` detects with probability `power` (normal approximation, variance at `base_rate`):
    (z_{1-alpha/2} + z_power) * sqrt(2 p (1 - p) / n). base_rate 0.5 gives the worst case."""
    if n_per_arm < 1 or not 0.0 <= base_rate <= 1.0:
        raise ValueError(f"need n_per_arm >= 1 and base_rate in [0, 1], got {n_per_arm}, {base_rate}")
    return (_z(1.0 - alpha / 2.0) + _z(power)) * math.sqrt(2.0 * base_rate * (1.0 - base_rate) / n_per_arm)


def _mcnemar_items(difference: float, discordant_rate: float, alpha: float, power: float) -> float:
    """Connor (1987): n = (z_a sqrt(psi) + z_b sqrt(psi - d^2))^2 / d^2 paired items (not rounded)."""
    z_a, z_b = _z(1.0 - alpha / 2.0), _z(power)
    spread = math.sqrt(max(discordant_rate - difference * difference, 0.0))
    return (z_a * math.sqrt(discordant_rate) + z_b * spread) ** 2 / difference ** 2


def mcnemar_items_needed(difference: float, discordant_rate: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Paired items the McNemar test needs to detect a difference of accuracies `difference` with
    probability `power` at two-sided level `alpha`, when a share `discordant_rate` (psi) of the items is
    right for one model only: the inverse of `mdd_mcnemar` (the sample size of a pre-registration)."""
    if not 0.0 < difference <= discordant_rate <= 1.0:
        raise ValueError(f"need 0 < difference <= discordant_rate <= 1 (only discordant items can differ), "
                         f"got difference={difference}, discordant_rate={discordant_rate}")
    return math.ceil(_mcnemar_items(difference, discordant_rate, alpha, power) - 1e-9)


def mdd_mcnemar(n_items: int, discordant_rate: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest difference of paired accuracies the McNemar test detects, for n items of which a share
    `discordant_rate` (psi) are right for one model only (Connor 1987: n = (z_a sqrt(psi) + z_b
    sqrt(psi - d^2))^2 / d^2, solved for d by bisection). Returns psi when even d = psi is not
    detectable (the difference cannot exceed the discordant share)."""
    if n_items < 1 or not 0.0 < discordant_rate <= 1.0:
        raise ValueError(f"need n_items >= 1 and discordant_rate in (0, 1], got {n_items}, {discordant_rate}")

    def needed_items(d: float) -> float:
        return _mcnemar_items(d, discordant_rate, alpha, power)

    lo, hi = 1e-9, discordant_rate  # |d| <= psi: only discordant items can differ
    if needed_items(hi) > n_items:
        return hi
    for _ in range(200):  # needed_items decreases in d: find the d where it equals n_items
        mid = (lo + hi) / 2.0
        if needed_items(mid) > n_items:
            lo = mid
        else:
            hi = mid
    return hi
