"""exit_loop.stats against hand-worked values (the arithmetic is in the comments) and the
bootstrap intervals' coverage on simulated data with a known true difference. Pure and fast:
the simulated data sets are drawn in one vectorised step each, with fixed seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from exit_loop.stats import (accuracy_interval, mcnemar_exact, paired_difference, pass_at_k,
                             pooled_difference, wilson)

Z = 1.959963984540054


# --- Wilson -------------------------------------------------------------------------------------

def test_wilson_hand_values():
    # k=0: centre = half = (z²/2n)/(1+z²/n), so lo = 0 and hi = z²/(n+z²) = 3.8415/13.8415 = 0.27753
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(Z * Z / (10 + Z * Z)) and hi == pytest.approx(0.27753, abs=1e-5)
    # k=n mirrors it: lo = n/(n+z²) = 10/13.8415 = 0.72247
    assert wilson(10, 10) == pytest.approx((10 / (10 + Z * Z), 1.0))
    # k=5, n=10: centre 0.5; half = z*sqrt(0.025 + z²/400)/(1 + z²/10) = 1.96*0.18602/1.38415 = 0.26341
    assert wilson(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(11, 10)


# --- McNemar ------------------------------------------------------------------------------------

@pytest.mark.parametrize("b, c, p", [
    (1, 6, 0.125),            # 2 * (C(7,0) + C(7,1)) / 2^7 = 2 * 8/128
    (6, 1, 0.125),            # symmetric in b and c
    (0, 5, 0.0625),           # 2 * C(5,0) / 2^5 = 2/32
    (12, 2, 212 / 16384),     # 2 * (1 + 14 + 91) / 2^14 = 0.012939...
    (4, 4, 1.0),              # b == c: the two tails overlap, capped at 1
    (3, 4, 1.0),              # 2 * (1 + 7 + 21 + 35)/2^7 = 128/128
    (0, 0, 1.0),              # no discordant pairs
])
def test_mcnemar_exact_hand_values(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-9)


def test_mcnemar_exact_rejects_negative_counts():
    with pytest.raises(ValueError, match="b=-1"):
        mcnemar_exact(-1, 3)


# --- pass@k -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 2, 0.7),           # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 3, 5, 11 / 12),      # 1 - C(7,5)/C(10,5) = 1 - 21/252 = 1 - 1/12
    (5, 5, 3, 1.0),           # n = c: every sample is correct
    (5, 0, 3, 0.0),           # c = 0: none is
    (8, 3, 1, 3 / 8),         # k = 1: c/n
    (5, 4, 2, 1.0),           # n - c < k: C(1,2) = 0, every pair holds a correct one
    (4, 1, 4, 1.0),           # k = n: pass iff c >= 1
])
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_the_binomial_formula():
    for n in range(1, 17):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_bad_input(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, c, k)


# --- paired difference (one seed) ---------------------------------------------------------------

def test_paired_difference_hand_example():
    a = [True, True, True, True, False, False]
    b = [False, False, False, True, False, False]
    d = paired_difference(a, b, n_resamples=2000, seed=1)
    # accuracies 4/6 and 1/6: diff = 3/6 = 0.5; A right and B wrong on 3 questions, the reverse on 0:
    # McNemar p = 2 * C(3,0)/2^3 = 0.25
    assert d["diff"] == pytest.approx(0.5) and d["p_mcnemar"] == pytest.approx(0.25) and d["n"] == 6
    lo, hi = d["ci95"]
    # per-question differences are 1,1,1,0,0,0: a resample's mean is a multiple of 1/6 in [0, 1]
    assert 0.0 <= lo < 0.5 < hi <= 1.0
    assert d == paired_difference(a, b, n_resamples=2000, seed=1)  # seeded: reproducible


def test_paired_difference_all_differences_equal():
    d = paired_difference([True, False, True], [True, False, True])
    assert d == {"diff": 0.0, "ci95": [0.0, 0.0], "p_mcnemar": 1.0, "n": 3}
    d = paired_difference([True] * 4, [False] * 4)
    assert d["diff"] == 1.0 and d["ci95"] == [1.0, 1.0] and d["p_mcnemar"] == pytest.approx(0.125)  # 2/2^4


def test_paired_difference_input_errors():
    with pytest.raises(ValueError, match=r"3 and 2"):
        paired_difference([True, False, True], [True, False])
    with pytest.raises(ValueError, match=r"0 and 0"):
        paired_difference([], [])


# --- pooled difference (several seeds) and accuracy intervals ------------------------------------

def test_pooled_difference_hand_example():
    pairs = [([True, False, False, False], [False] * 4),   # seed 0: 1/4 - 0 = 0.25
             ([True, True], [False, False])]                # seed 1: 1 - 0 = 1.0
    d = pooled_difference(pairs, n_resamples=2000)
    # the mean of the per-seed differences, (0.25 + 1.0)/2 = 0.625 (not the question-weighted 3/6)
    assert d["diff"] == pytest.approx(0.625) and d["p_mcnemar"] is None and d["n"] == 6 and d["seeds"] == 2
    lo, hi = d["ci95"]
    # the smallest possible statistic draws seed 0 twice with no right answer: 0; the largest: 1
    assert 0.0 <= lo < 0.625 < hi <= 1.0
    assert pooled_difference([([True, True], [False, False])] * 3)["ci95"] == [1.0, 1.0]  # all equal


def test_pooled_difference_of_one_seed_is_the_paired_interval():
    rng = np.random.default_rng(3)
    a, b = rng.random(300) < 0.7, rng.random(300) < 0.6
    one, pooled = paired_difference(a, b), pooled_difference([(a, b)])
    assert pooled["diff"] == pytest.approx(one["diff"]) and pooled["seeds"] == 1
    assert pooled["ci95"] == pytest.approx(one["ci95"], abs=0.01)  # two bootstraps of the same thing


def test_pooled_difference_input_errors():
    with pytest.raises(ValueError, match="none"):
        pooled_difference([])
    with pytest.raises(ValueError, match=r"seed 1 .* 2 and 3"):
        pooled_difference([([True], [False]), ([True, True], [True, False, True])])


def test_accuracy_interval():
    # one seed: Wilson over its questions, 5 of 10 right -> (0.23659, 0.76341) as above
    assert accuracy_interval([[True] * 5 + [False] * 5]) == pytest.approx([0.23659, 0.76341], abs=1e-5)
    # several seeds: a bootstrap of the mean accuracy over seeds, here (0.5 + 0.75)/2 = 0.625. With two
    # seeds a quarter of the resamples draw seed 0 twice (around 0.5, sd ~0.05/sqrt(2)) and a quarter
    # seed 1 twice (around 0.75): the 2.5% and 97.5% points are those clusters' 10% and 90% points,
    # about 0.5 - 1.28*0.035 = 0.455 and 0.75 + 1.28*0.031 = 0.79; the seed spread is in the interval.
    lo, hi = accuracy_interval([[True, False] * 50, [True, True, True, False] * 25], n_resamples=2000)
    assert 0.40 < lo < 0.5 and 0.75 < hi < 0.85
    assert accuracy_interval([[True] * 3, [True] * 5]) == [1.0, 1.0]
    with pytest.raises(ValueError):
        accuracy_interval([])


# --- coverage on simulated data -----------------------------------------------------------------

# Joint law of (A right, B right) per question: P(both) 0.55, P(A only) 0.15, P(B only) 0.05,
# P(neither) 0.25: A is right with 0.7, B with 0.6, positively correlated; true difference 0.10.
P_BOTH, P_A_ONLY, P_B_ONLY, TRUE_DIFF = 0.55, 0.15, 0.05, 0.10


def test_paired_bootstrap_coverage():
    sets, n = 200, 200
    u = np.random.default_rng(20240518).random((sets, n))  # every data set in one draw
    a = u < P_BOTH + P_A_ONLY
    b = (u < P_BOTH) | ((u >= P_BOTH + P_A_ONLY) & (u < P_BOTH + P_A_ONLY + P_B_ONLY))
    assert abs((a.mean(axis=1) - b.mean(axis=1)).mean() - TRUE_DIFF) < 0.01  # the simulation is right
    covered = 0
    for i in range(sets):
        lo, hi = paired_difference(a[i], b[i], n_resamples=999, seed=i)["ci95"]
        covered += lo <= TRUE_DIFF <= hi
    assert 0.92 <= covered / sets <= 0.98, covered / sets


def test_pooled_bootstrap_coverage_with_a_seed_effect():
    # 200 experiments of 3 seeds x 200 questions. Each seed shifts the difference by 2e, e ~ N(0, 0.01)
    # (clipped at +-0.045, symmetric): a seed-level sd of 2 points on top of ~3 points of question noise;
    # the true difference, averaged over seeds, stays 0.10.
    sets, seeds, n = 200, 3, 200
    rng = np.random.default_rng(7)
    e = np.clip(rng.normal(0.0, 0.01, size=(sets, seeds, 1)), -0.045, 0.045)
    u = rng.random((sets, seeds, n))
    a = u < P_BOTH + P_A_ONLY + e
    b = (u < P_BOTH) | ((u >= P_BOTH + P_A_ONLY + e) & (u < P_BOTH + P_A_ONLY + P_B_ONLY))
    covered = 0
    for i in range(sets):
        d = pooled_difference([(a[i, s], b[i, s]) for s in range(seeds)], n_resamples=999, seed=i)
        covered += d["ci95"][0] <= TRUE_DIFF <= d["ci95"][1]
    assert 0.90 <= covered / sets <= 0.99, covered / sets
