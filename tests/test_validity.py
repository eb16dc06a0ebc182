"""Probe validity (issue 20): probe families, control task and selectivity, calibration and
operating points, multiple testing, and the summary columns the probe job writes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import false_discovery_control
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from layerscope.analysis import validity as V
from layerscope.analysis.probes import fit_probe, make_folds


def _planted(n=60, d=24, shift=1.5, seed=0, signal=True):
    """Pairs of prompts (one per class per group) with the label along axis 0 when ``signal``."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = np.tile([0, 1], n // 2)
    groups = np.repeat(np.arange(n // 2), 2)
    if signal:
        X[y == 1, 0] += shift
    return X, y, groups


# ----------------------------------------------------------------------------------------------
# families


def test_mass_mean_is_the_analytic_direction_on_planted_gaussians():
    rng = np.random.default_rng(1)
    d, n = 16, 4000
    mu0, mu1 = rng.standard_normal(d), rng.standard_normal(d)
    X = np.vstack([mu0 + rng.standard_normal((n, d)), mu1 + rng.standard_normal((n, d))])
    y = np.repeat([0, 1], n)
    W, b = V.discriminant(X, y, 2, 1.0)
    # exactly the sample mean difference up to a positive scale ...
    diff = X[y == 1].mean(0) - X[y == 0].mean(0)
    assert np.allclose(W[0] / np.linalg.norm(W[0]), diff / np.linalg.norm(diff), atol=1e-12)
    # ... which estimates the planted one
    cos = W[0] @ (mu1 - mu0) / np.linalg.norm(W[0]) / np.linalg.norm(mu1 - mu0)
    assert cos > 0.995
    # the score is a projection: the decision is affine in x . direction
    proj = X @ diff
    assert np.corrcoef(proj, X @ W[0] + b[0])[0, 1] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("shrinkage", [0.05, 0.3, 1.0])
def test_lda_equals_sklearn_linear_discriminant_analysis(shrinkage):
    rng = np.random.default_rng(2)
    n, d = 300, 12
    A = rng.standard_normal((d, d))
    X = rng.standard_normal((n, d)) @ A  # correlated features: whitening matters
    y = (rng.random(n) < 0.35).astype(int)
    X[y == 1] += rng.standard_normal(d)
    W, b = V.discriminant(X, y, 2, shrinkage)
    ref = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrinkage).fit(X, y)
    scale = W[0] @ ref.coef_[0] / (ref.coef_[0] @ ref.coef_[0])
    assert scale > 0
    assert np.allclose(W[0], scale * ref.coef_[0], rtol=1e-8, atol=1e-10)
    assert np.allclose(b, ref.intercept_, rtol=1e-8)  # the same log-odds, scale 1


def test_lda_multiclass_equals_sklearn_probabilities():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((240, 8))
    y = np.repeat([0, 1, 2], 80)
    X += np.eye(8)[y] * 1.5
    W, b = V.discriminant(X, y, 3, 0.2)
    ref = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=0.2).fit(X, y)
    assert np.allclose(V.proba_of(X, W, b), ref.predict_proba(X), atol=1e-10)


def test_wide_activations_use_the_dual_and_match_the_primal():
    """d >> n: the Gram-matrix route equals inverting the shrunk covariance directly."""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((30, 200))
    y = np.tile([0, 1], 15)
    W, _ = V.discriminant(X, y, 2, 0.4)
    mu = np.array([X[y == c].mean(0) for c in (0, 1)])
    Xc = X - mu[y]
    S = Xc.T @ Xc / len(y)
    Sl = 0.6 * S + 0.4 * np.trace(S) / 200 * np.eye(200)
    assert np.allclose(W[0], np.linalg.solve(Sl, mu[1] - mu[0]), rtol=1e-7, atol=1e-9)


def test_family_cv_uses_the_given_folds_and_cosines():
    X, y, g = _planted(shift=2.5)
    ids = make_folds(y, g, n_splits=5, n_repeats=2, seed=0)
    mm = V.family_cv(X, y, g, 2, ids, "mass_mean")
    lda = V.family_cv(X, y, g, 2, ids, "lda")
    assert len(mm.fold_scores["auroc"]) == 10 and mm.shrinkage is None
    assert lda.shrinkage in (0.01, 0.1, 0.3, 0.6, 0.9)
    assert mm.metrics["auroc"]["mean"] > 0.75
    # every held-out probability comes from a probe that did not see the row
    r, f = 0, 0
    te = ids[r] == f
    W, b = V.discriminant(X[~te], y[~te], 2, 1.0)
    assert np.allclose(mm.oof[r, te], V.proba_of(X[te], W, b))
    cos = V.direction_cosines({"a": mm.coef, "b": 2 * mm.coef, "c": -mm.coef})
    assert cos == pytest.approx({"a~b": 1.0, "a~c": -1.0, "b~c": -1.0})


# ----------------------------------------------------------------------------------------------
# control task and selectivity


def _selectivity(X, y, g, seed=0):
    res = fit_probe(X, y, g, n_splits=5, n_repeats=2, n_permutations=0, n_random_directions=0)
    out = V.probe_validity(X, y, g, res, n_boot=500, families=("logistic", "mass_mean"))
    return out, res


def test_control_labels_keep_frequencies_and_groups():
    X, y, g = _planted()
    ids = make_folds(y, g, n_splits=5, n_repeats=2)
    cc = V.control_labels(y, g, ids, 2, seed=0)
    assert np.bincount(cc).tolist() == np.bincount(y).tolist()
    for grp in np.unique(g):  # mixed groups: shuffled within the group, counts kept
        assert sorted(cc[g == grp]) == sorted(y[g == grp])
    assert not np.array_equal(cc, y)
    # one label per group: labels move between whole groups
    y1 = np.repeat(np.tile([0, 1], 15), 2)
    ids1 = make_folds(y1, g, n_splits=5, n_repeats=1)
    c1 = V.control_labels(y1, g, ids1, 2, seed=0)
    assert np.bincount(c1).tolist() == np.bincount(y1).tolist()
    assert all(np.unique(c1[g == grp]).size == 1 for grp in np.unique(g))


def test_selectivity_contains_zero_without_signal_and_is_high_with_it():
    """No signal: the 95 % interval holds 0 on (nearly) every one of 10 null datasets (one miss
    allowed per family: it is a 95 % interval). ~6 s."""
    covered = {"logistic": 0, "mass_mean": 0}
    for seed in range(10):
        X, y, g = _planted(signal=False, seed=200 + seed)
        none, _ = _selectivity(X, y, g)
        for fam in covered:
            s = none["families"][fam]["selectivity"]
            covered[fam] += s["ci_low"] < 0 < s["ci_high"]
    assert min(covered.values()) >= 9, covered
    X, y, g = _planted(shift=2.5, seed=5)
    some, res = _selectivity(X, y, g)
    for fam in ("logistic", "mass_mean"):
        s = some["families"][fam]["selectivity"]
        assert s["ci_low"] > 0.2, (fam, s)
        assert s["ci_low"] <= s["value"] <= s["ci_high"]
        assert s["boot_ci_low"] <= s["value"] <= s["boot_ci_high"]
    assert some["control"]["scheme"] == "within_groups"


def test_selectivity_point_is_the_paired_mean_difference():
    X, y, g = _planted(seed=6)
    res = fit_probe(X, y, g, n_splits=4, n_repeats=1, n_permutations=0, n_random_directions=0)
    ids = np.asarray(res.fold_ids)
    cc = V.control_labels(y, g, ids, 2, seed=0)
    ctrl = fit_probe(
        X, cc, g, n_splits=4, n_repeats=1, n_permutations=0, n_random_directions=0, fold_ids=ids
    )
    s = V.paired_selectivity(y, res.oof_proba, cc, ctrl.oof_proba, ids, 2, n_boot=0)
    expected = np.mean(res.fold_scores["auroc"]) - np.mean(ctrl.fold_scores["auroc"])
    assert s["value"] == pytest.approx(expected, abs=1e-12)
    assert ctrl.fold_ids == res.fold_ids  # the same folds


def test_weighted_auroc_equals_auroc_of_the_repeated_rows():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(7)
    y = np.array([0, 1, 0, 1, 1, 0, 0, 1])
    s = np.round(rng.random(8), 1)  # ties
    proba = np.column_stack([1 - s, s])
    w = np.array([[2, 0, 1, 1, 3, 1, 0, 1]], dtype=float)
    rows = np.repeat(np.arange(8), w[0].astype(int))
    got = V._weighted_primary(y, proba, w, 2)[0]
    assert got == pytest.approx(roc_auc_score(y[rows], s[rows]))


# ----------------------------------------------------------------------------------------------
# calibration and operating points


def test_ece_equal_mass_by_hand():
    p = np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.7])
    y = np.array([0, 1, 1, 1, 0, 0])
    # sorted p: .1 .2 .3 | .7 .8 .9 with y 0 1 0 | 0 1 1 (2 bins of 3)
    hand = 0.5 * abs(1 / 3 - 0.2) + 0.5 * abs(2 / 3 - 0.8)
    assert V.ece_equal_mass(y, p, n_bins=2) == pytest.approx(hand)
    # 4 bins of sizes 2, 2, 1, 1 (np.array_split)
    hand4 = (2 * abs(0.5 - 0.15) + 2 * abs(0 - 0.5) + abs(1 - 0.8) + abs(1 - 0.9)) / 6
    assert V.ece_equal_mass(y, p, n_bins=4) == pytest.approx(hand4)
    bins = V.reliability_bins(y, p, n_bins=2)
    assert [b["n"] for b in bins] == [3, 3] and bins[0]["p_mean"] == pytest.approx(0.2)


def test_recall_at_fpr_by_hand():
    neg = np.arange(100) / 100.0  # 0.00 .. 0.99
    pos = np.array([0.995, 0.985, 0.975, 0.955, 0.5])
    s = np.r_[neg, pos]
    y = np.r_[np.zeros(100), np.ones(5)]
    # 1 % of 100 negatives: one may be flagged; threshold = 2nd highest negative 0.98
    assert V.recall_at_fpr(y, s, 0.01) == pytest.approx(2 / 5)
    # 5 %: threshold = 6th highest negative 0.94 -> four positives above
    assert V.recall_at_fpr(y, s, 0.05) == pytest.approx(4 / 5)
    # 0.5 % of 100: none may be flagged; threshold = the highest negative 0.99
    assert V.recall_at_fpr(y, s, 0.005) == pytest.approx(1 / 5)
    assert np.isnan(V.recall_at_fpr(np.ones(3), [0.1, 0.2, 0.3], 0.05))


def test_calibration_intervals_and_multiclass():
    rng = np.random.default_rng(8)
    y = rng.integers(0, 2, 80)
    p = np.clip(0.5 + 0.3 * (2 * y - 1) + 0.2 * rng.standard_normal(80), 0.01, 0.99)
    oof = np.stack([np.column_stack([1 - p, p])] * 2)
    cal = V.calibration(y, oof, 2, n_bins=5, n_boot=300)
    assert cal["ece"]["value"] == pytest.approx(V.ece_equal_mass(y, p, 5))
    assert cal["ece"]["ci_low"] <= cal["ece"]["value"] <= cal["ece"]["ci_high"]
    r = cal["recall_at_fpr_0.05"]
    assert r["value"] == pytest.approx(V.recall_at_fpr(y, p, 0.05))
    assert r["ci_low"] <= r["ci_high"]
    P3 = rng.dirichlet(np.ones(3), 30)[None]
    cal3 = V.calibration(rng.integers(0, 3, 30), P3, 3, n_boot=10)
    assert cal3["recall_at_fpr_0.01"]["value"] is None and cal3["ece"]["value"] >= 0


# ----------------------------------------------------------------------------------------------
# multiple testing


def test_holm_and_bh_against_scipy_and_by_hand():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.2, 0.04])
    assert np.allclose(V.benjamini_hochberg(p), false_discovery_control(p, method="bh"))
    # Holm by hand: sorted .005 .01 .03 .04 .04 .2 times 6 5 4 3 2 1 -> .03 .05 .12 .12 .08 .2,
    # running max -> .03 .05 .12 .12 .12 .2
    hand = {3: 0.03, 0: 0.05, 2: 0.12, 1: 0.12, 5: 0.12, 4: 0.2}
    got = V.holm(p)
    assert np.allclose([got[i] for i in range(6)], [hand[i] for i in range(6)])
    rng = np.random.default_rng(9)
    q = rng.random(50) ** 3
    assert np.allclose(V.benjamini_hochberg(q), false_discovery_control(q, method="bh"))
    with_nan = V.holm([0.01, None, 0.02])
    assert np.isnan(with_nan[1]) and np.allclose(with_nan[[0, 2]], [0.02, 0.02])


def test_reliability_diagram_draws(tmp_path):
    from layerscope.plotting import plots

    rng = np.random.default_rng(10)
    y, p = rng.integers(0, 2, 50), rng.random(50)
    curves = {"logistic": {"bins": V.reliability_bins(y, p, 5), "ece": V.ece_equal_mass(y, p, 5)}}
    paths = plots.reliability_diagram(curves, tmp_path / "rel.png")
    assert (tmp_path / "rel.png").stat().st_size > 5_000 and len(paths) == 1
