"""layerscope.analysis.power: intervals and sample sizes, checked against independent
computations."""

import math

import numpy as np
import pytest
from scipy import stats

from layerscope.analysis import power as P
from layerscope.errors import LayerscopeError


def test_wilson_matches_the_textbook_formula_and_scipy():
    # scipy's binomtest implements the Wilson interval independently of our vectorised formula.
    for k, n in [(0, 9), (3, 9), (9, 9), (17, 40), (1, 1)]:
        lo, hi = P.wilson_interval(k, n)
        ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)
    lo, hi = P.wilson_interval([0, 3], [0, 9])
    assert np.isnan(lo[0]) and np.isnan(hi[0]) and hi[1] > lo[1]


def test_n_for_rate_half_width_is_the_smallest_n_that_reaches_it():
    for target, p in [(0.1, 0.5), (0.05, 0.5), (0.1, 0.2), (0.2, 0.9)]:
        n = P.n_for_rate_half_width(target, p)
        assert P.wilson_half_width(p, n) <= target < P.wilson_half_width(p, n - 1)
    with pytest.raises(LayerscopeError):
        P.n_for_rate_half_width(0.0)


def test_binomial_power_equals_a_brute_force_sum():
    n, p0, p1, alpha = 20, 0.1, 0.4, 0.05
    # reject H0 for counts whose upper tail under p0 is at most alpha/2
    reject = [
        k
        for k in range(n + 1)
        if sum(math.comb(n, j) * p0**j * (1 - p0) ** (n - j) for j in range(k, n + 1)) <= alpha / 2
    ]
    brute = sum(math.comb(n, k) * p1**k * (1 - p1) ** (n - k) for k in reject)
    assert P.binomial_power(n, p0, p1, alpha) == pytest.approx(brute, rel=1e-10)


def test_n_for_rate_power_reaches_the_power_and_one_less_does_not():
    for p0, p1 in [(0.0, 0.3), (0.5, 0.7), (0.2, 0.05)]:
        n = P.n_for_rate_power(p0, p1)
        assert P.binomial_power(n, p0, p1) >= 0.8
        assert all(P.binomial_power(m, p0, p1) < 0.8 for m in range(1, n))


def test_t_power_matches_a_simulation():
    rng = np.random.default_rng(0)
    n, effect, sd = 12, 0.8, 1.0
    x = rng.normal(effect, sd, size=(20000, n))
    t = x.mean(1) / (x.std(1, ddof=1) / np.sqrt(n))
    simulated = np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1))
    assert P.t_power(n, effect, sd) == pytest.approx(simulated, abs=0.01)
    need = P.n_for_mean_power(effect, sd)
    assert P.t_power(need, effect, sd) >= 0.8 > P.t_power(need - 1, effect, sd)


def test_mean_precision_interval_equals_scipy_t_interval():
    vals = [0.3, 1.2, -0.4, 0.9, 0.5, float("nan")]
    out = P.mean_precision(vals, half_width=0.1, effect=0.5)
    x = np.array(vals[:-1])
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert (
        out["n"] == 5 and out["ci_low"] == pytest.approx(lo) and out["ci_high"] == pytest.approx(hi)
    )
    assert P.t_half_width(x.std(ddof=1), out["n_for_half_width"]) <= 0.1


def test_rate_precision_for_the_seed_case_of_nine_pairs():
    # The activation-patching seed: 3 of 9 pairs recovered. The interval is far wider than +-0.1.
    out = P.rate_precision(3, 9, half_width=0.1, effect=0.3)
    assert out["half_width"] > 0.25
    assert out["n_for_half_width"] > 50
    assert out["n_for_power"] == P.n_for_rate_power(0.0, 0.3)
