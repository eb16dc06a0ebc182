"""Permutation p-values (issue 13, item 9): sequential up to n_permutations with a stated
Monte-Carlo
error, and independent permutation streams per layer."""

import math

import numpy as np
import pytest

from layerscope.analysis.probes import (
    PERMUTATION_ALPHA,
    PERMUTATION_BATCH,
    PERMUTATION_Z,
    fit_probe,
    permutation_p,
    summary_rows,
)

FAST = dict(n_splits=3, n_repeats=1, inner_splits=2, Cs=(1.0,), n_random_directions=0)


def _data(signal: float, n: int = 48, d: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.array(["a", "b"] * (n // 2))
    X = rng.normal(size=(n, d))
    X[:, 0] += signal * (y == "b")
    return X, y


def test_p_value_and_monte_carlo_error():
    p, se = permutation_p(69, 999)
    assert p == pytest.approx(0.07) and se == pytest.approx(math.sqrt(0.07 * 0.93 / 1000))
    assert permutation_p(9, 99)[1] == pytest.approx(math.sqrt(0.1 * 0.9 / 100))


@pytest.mark.parametrize("signal", [0.0, 3.0])
def test_clear_results_stop_after_one_batch(signal):
    X, y = _data(signal)
    perm = fit_probe(X, y, None, n_permutations=1000, **FAST).permutation
    assert perm["n_drawn"] == PERMUTATION_BATCH and perm["stopped_early"]
    assert len(perm["scores"]) == PERMUTATION_BATCH
    assert abs(perm["p_value"] - PERMUTATION_ALPHA) > PERMUTATION_Z * perm["mc_se"]
    assert (perm["p_value"], perm["mc_se"]) == permutation_p(round(perm["p_value"] * 101) - 1, 100)


def test_borderline_result_draws_more_and_its_error_is_small():
    # Search a weak signal whose p after one batch is near 0.05: it must keep drawing.
    for seed in range(40):
        X, y = _data(0.6, seed=seed)
        perm = fit_probe(X, y, None, n_permutations=600, **FAST).permutation
        if perm["n_drawn"] > PERMUTATION_BATCH:
            break
    else:
        pytest.fail("no borderline case found")
    assert perm["n_drawn"] % PERMUTATION_BATCH == 0 and perm["n_drawn"] <= 600
    stopped_on_rule = abs(perm["p_value"] - PERMUTATION_ALPHA) > PERMUTATION_Z * perm["mc_se"]
    assert stopped_on_rule or perm["n_drawn"] == 600
    assert perm["mc_se"] < 0.02


def test_streams_differ_by_layer_and_repeat_exactly():
    X, y = _data(0.5)
    a = fit_probe(X, y, None, n_permutations=50, stream=(3, 0, 0), **FAST).permutation
    b = fit_probe(X, y, None, n_permutations=50, stream=(4, 0, 0), **FAST).permutation
    again = fit_probe(X, y, None, n_permutations=50, stream=(3, 0, 0), **FAST).permutation
    assert a["scores"] == again["scores"]
    assert a["scores"] != b["scores"]


def test_summary_rows_carry_the_monte_carlo_error():
    X, y = _data(1.0)
    result = fit_probe(X, y, None, n_permutations=100, **FAST)
    primary = next(r for r in summary_rows(result, (0.55, 0.65)) if r["primary"])
    assert (
        primary["p_permutation_se"] == pytest.approx(result.permutation["mc_se"])
        and primary["p_permutation_se"] > 0
    )


def test_a_clear_signal_draws_until_settled_at_the_corrected_level():
    # alpha / m for m = 12 tests: after 100 permutations p >= 1/101 is not clearly below it, so a
    # strong signal keeps drawing until it is (and then passes Holm over 12 tests).
    X, y = _data(3.0)
    level = 0.05 / 12
    perm = fit_probe(X, y, None, n_permutations=1000, permutation_level=level, **FAST).permutation
    assert perm["level"] == level and perm["n_drawn"] > PERMUTATION_BATCH
    assert perm["p_value"] + PERMUTATION_Z * perm["mc_se"] < level or perm["n_drawn"] == 1000
    assert 12 * perm["p_value"] < 0.05
    with pytest.raises(Exception, match="permutation_level"):
        fit_probe(X, y, None, n_permutations=10, permutation_level=0.0, **FAST)


def test_holm_floor_warning_names_the_key_and_the_count():
    import pandas as pd

    from layerscope.jobs.probe_runs import holm_floor_warning

    table = pd.DataFrame({"probe": ["logistic"] * 24 + ["lda"] * 24, "primary": [True, False] * 24})
    assert holm_floor_warning(table, 1000, 0.05) is None  # 12 / 1001 < 0.05
    warning = holm_floor_warning(table, 100, 0.05)  # 12 / 101 = 0.119
    assert warning.startswith("holm_floor:") and "probes.n_permutations to at least 240" in warning
    assert holm_floor_warning(table, 0, 0.05) is None  # no permutation test at all
