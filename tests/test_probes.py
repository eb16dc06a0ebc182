"""Tests for layerscope.analysis.probes (small n, few permutations: the whole file runs in
seconds)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from layerscope.analysis.probes import (
    METRICS,
    ProbeInputError,
    cross_dataset_matrix,
    effective_n_splits,
    fit_probe,
    fold_metrics,
    interpret,
    make_folds,
    summary_rows,
)

SMALL_CS = (0.01, 1.0, 100.0)


def _planted_binary(seed: int, n_pairs=(12, 8), d=6, shift=1.2):
    """Pairs of rows (a group) share a label; class 1 is shifted along feature 0."""
    rng = np.random.default_rng(seed)
    n1, n0 = n_pairs
    y = np.repeat(np.r_[np.ones(n1, int), np.zeros(n0, int)], 2)
    groups = np.repeat(np.arange(n1 + n0), 2)
    X = rng.normal(size=(len(y), d))
    X[:, 0] += shift * y
    return X, y, groups


def _by_hand(X, codes, train, test, C, max_iter=1000):
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    model.fit(X[train], codes[train])
    return model.predict_proba(X[test]), model.predict(X[test])


# ----------------------------------------------------------------------------------- metrics


def test_metrics_equal_sklearn_on_the_same_folds():
    X, y, groups = _planted_binary(0)
    labels = np.where(y == 1, "yes", "no")  # sorted: ['no', 'yes'] -> 'yes' is positive
    res = fit_probe(
        X,
        labels,
        groups,
        n_splits=4,
        n_repeats=2,
        Cs=SMALL_CS,
        n_permutations=0,
        n_random_directions=0,
        seed=3,
    )
    assert (
        res.classes == ["no", "yes"]
        and res.positive_class == "yes"
        and res.primary_metric == "auroc"
    )
    folds = make_folds(labels, groups, n_splits=4, n_repeats=2, seed=3)
    assert folds.tolist() == res.fold_ids
    assert len(res.fold_C) == 8 and set(res.fold_C) <= set(SMALL_CS)
    assert all(src == "inner_cv" for src in res.fold_C_source)

    expected = {m: [] for m in METRICS}
    i = 0
    for r in range(2):
        for f in range(4):
            test = folds[r] == f
            proba, pred = _by_hand(X, labels, ~test, test, res.fold_C[i])
            yt = labels[test]
            expected["accuracy"].append(accuracy_score(yt, pred))
            expected["balanced_accuracy"].append(balanced_accuracy_score(yt, pred))
            expected["auroc"].append(roc_auc_score(yt == "yes", proba[:, 1]))
            expected["f1"].append(f1_score(yt, pred, pos_label="yes"))
            i += 1
    for m in METRICS:
        np.testing.assert_allclose(res.fold_scores[m], expected[m], rtol=0, atol=1e-12, err_msg=m)
        vals = np.asarray(expected[m])
        s = res.metrics[m]
        assert s["n"] == 8
        assert s["mean"] == pytest.approx(vals.mean(), abs=1e-12)
        assert s["std"] == pytest.approx(vals.std(ddof=1), abs=1e-12)
        # corrected repeated k-fold t-interval, by hand
        ratios = [
            np.mean(folds[r] == f) / np.mean(folds[r] != f) for r in range(2) for f in range(4)
        ]
        half = stats.t.ppf(0.975, 7) * math.sqrt(vals.var(ddof=1) * (1 / 8 + np.mean(ratios)))
        assert s["ci_low"] == pytest.approx(max(0.0, vals.mean() - half), abs=1e-12)
        assert s["ci_high"] == pytest.approx(min(1.0, vals.mean() + half), abs=1e-12)
    assert "Nadeau" in res.ci_method


def test_positive_class_first_in_sorted_order():
    X, y, groups = _planted_binary(1)
    labels = np.where(y == 1, "b", "a")
    res = fit_probe(
        X,
        labels,
        groups,
        n_splits=3,
        n_repeats=1,
        Cs=(1.0,),
        n_permutations=0,
        n_random_directions=0,
        positive_class="a",
    )
    assert res.classes == ["b", "a"] and res.positive_class == "a"
    # metrics are computed for 'a' as the positive class ...
    folds = np.asarray(res.fold_ids[0])
    for f in range(3):
        test = folds == f
        proba, pred = _by_hand(X, labels, ~test, test, 1.0)
        col = list(np.unique(labels)).index("a")
        want = roc_auc_score(labels[test] == "a", proba[:, col])
        assert res.fold_scores["auroc"][f] == pytest.approx(want, abs=1e-12)
        assert res.fold_scores["f1"][f] == pytest.approx(
            f1_score(labels[test], pred, pos_label="a"), abs=1e-12
        )
    # ... and the saved direction points toward 'a' (feature 0 is lower for 'a')
    assert np.asarray(res.coef)[0, 0] < 0


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(2, 4),
    n=st.integers(2, 30),
    seed=st.integers(0, 2**32 - 1),
    ties=st.booleans(),
)
def test_fold_metrics_equal_sklearn(k, n, seed, ties):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    proba = rng.dirichlet(np.ones(k), size=n)
    if ties:
        proba = proba[
            rng.integers(0, min(3, n), size=n)
        ]  # rows drawn from 3 distinct ones: many tied scores
    got = fold_metrics(y, proba, k)
    pred = np.argmax(proba, axis=1)
    assert got["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert got["balanced_accuracy"] == pytest.approx(
            balanced_accuracy_score(y, pred), abs=1e-12
        )
        if k == 2:
            assert got["f1"] == pytest.approx(
                f1_score(y, pred, pos_label=1, zero_division=0), abs=1e-12
            )
        else:
            f1 = f1_score(y, pred, labels=list(range(k)), average="macro", zero_division=0)
            assert got["f1"] == pytest.approx(f1, abs=1e-12)
    if len(np.unique(y)) < k:
        assert math.isnan(got["auroc"])
    elif k == 2:
        assert got["auroc"] == pytest.approx(roc_auc_score(y, proba[:, 1]), abs=1e-12)
    else:
        want = roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=list(range(k)))
        assert got["auroc"] == pytest.approx(want, abs=1e-12)


# ------------------------------------------------------------------------------------- folds


@st.composite
def group_structures(draw):
    k = draw(st.integers(2, 3))
    n_groups = draw(st.integers(2 * k, 16))
    mixed = draw(st.booleans())
    y, groups = [], []
    for g in range(n_groups):
        size = draw(st.integers(1, 4))
        if mixed:
            labels = draw(st.lists(st.integers(0, k - 1), min_size=size, max_size=size))
        else:
            labels = [g % k] * size  # every class gets >= 2 groups
        y += labels
        groups += [100 + 7 * g] * size
    perm = draw(st.permutations(range(len(y))))
    return np.asarray(y)[list(perm)], np.asarray(groups)[list(perm)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    structure=group_structures(),
    n_splits=st.integers(2, 6),
    n_repeats=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
def test_grouped_folds_never_split_a_group(structure, n_splits, n_repeats, seed):
    y, groups = structure
    gpc = [len(np.unique(groups[y == c])) for c in np.unique(y)]
    assume(len(gpc) >= 2)
    if min(gpc) < 2:
        with pytest.raises(ProbeInputError, match="at least 2 groups"):
            make_folds(y, groups, n_splits=n_splits, n_repeats=n_repeats, seed=seed)
        return
    try:
        folds = make_folds(y, groups, n_splits=n_splits, n_repeats=n_repeats, seed=seed)
    except ProbeInputError as e:  # only allowed for awkward mixed-label groups
        assert "training part" in str(e)
        return
    k_eff = effective_n_splits(y, groups, n_splits)
    assert k_eff == min(n_splits, min(gpc))
    assert folds.shape == (n_repeats, len(y))
    for r in range(n_repeats):
        assert set(folds[r].tolist()) == set(range(k_eff))
        for g in np.unique(groups):
            assert len(set(folds[r][groups == g].tolist())) == 1
        for f in range(k_eff):  # every training part holds every class
            assert set(y[folds[r] != f].tolist()) == set(y.tolist())
    again = make_folds(y, groups, n_splits=n_splits, n_repeats=n_repeats, seed=seed)
    assert np.array_equal(folds, again)


def test_n_splits_lowered_and_errors():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 0, 0, 1, 1, 1, 1, 1, 1], 2)  # class 0 has 3 groups
    groups = np.repeat(np.arange(9), 2)
    X = rng.normal(size=(len(y), 3))
    res = fit_probe(
        X, y, groups, n_splits=5, n_repeats=1, Cs=(1.0,), n_permutations=0, n_random_directions=0
    )
    assert res.n_splits_requested == 5 and res.n_splits == 3
    assert any("lowered" in note for note in res.notes)
    with pytest.raises(ProbeInputError, match="at least 2 groups"):
        fit_probe(X, y, np.where(y == 0, 0, groups), n_permutations=0, n_random_directions=0)
    with pytest.raises(ProbeInputError, match="single class"):
        fit_probe(X, np.zeros(len(y)), groups)
    with pytest.raises(ProbeInputError, match="NaN"):
        fit_probe(np.full_like(X, np.nan), y, groups)
    with pytest.raises(ProbeInputError, match="1-D"):
        fit_probe(X, y[:-1], groups)


# ------------------------------------------------------------------------------ signal / noise


def test_pure_noise_is_not_called_a_signal():
    """Null data, 5 independent seeds. A valid test gives P(p <= 0.05) <= 0.05 per seed and a
    95% interval misses chance with probability ~<= 0.05, so demanding at most one miss of
    each kind in 5 seeds fails by chance with probability < 0.03 -- no single lucky seed."""
    p_small = missed = 0
    aurocs = []
    for seed in range(5):
        rng = np.random.default_rng(1000 + seed)
        X = rng.normal(size=(40, 20))
        y = rng.permutation(np.repeat([0, 1], 20))
        res = fit_probe(
            X,
            y,
            n_splits=4,
            n_repeats=2,
            Cs=SMALL_CS,
            n_permutations=19,
            n_random_directions=0,
            seed=seed,
        )
        s = res.metrics["auroc"]
        aurocs.append(s["mean"])
        p_small += res.permutation["p_value"] <= 0.05
        missed += not (s["ci_low"] <= 0.5 <= s["ci_high"])
        assert res.permutation["scheme"] == "groups"  # one row per group: plain label shuffle
        assert interpret(s["ci_low"], s["ci_high"]) != "direction exists"
    assert p_small <= 1 and missed <= 1
    assert abs(np.mean(aurocs) - 0.5) < 0.15


def test_planted_direction_is_found():
    X, y, groups = _planted_binary(7, n_pairs=(10, 10), d=5, shift=3.0)
    res = fit_probe(
        X,
        y,
        groups,
        n_splits=4,
        n_repeats=1,
        Cs=SMALL_CS,
        n_permutations=100,
        n_random_directions=5,
        seed=0,
    )
    auroc = res.metrics["auroc"]
    assert auroc["mean"] > 0.95
    assert res.permutation["metric"] == "auroc" and res.permutation["scheme"] == "groups"
    assert res.permutation["p_value"] < 0.01  # = 1/101: no permutation reached the observed score
    assert len(res.permutation["scores"]) == 100
    assert res.random_directions["n"] == 5 and len(res.random_directions["scores"]) == 5
    assert res.random_directions["p95"] <= 1.0
    assert interpret(auroc["ci_low"], auroc["ci_high"]) == "direction exists"
    w = np.asarray(res.coef)[0]
    assert w[0] > 0 and abs(w[0]) / np.linalg.norm(w) > 0.9  # points along the planted feature


def test_multiclass_planted():
    rng = np.random.default_rng(3)
    k, per_class, d = 5, 10, 8
    y = np.repeat(np.arange(k), per_class)
    groups = np.repeat(np.arange(k * per_class // 2), 2)  # pairs inside a class
    X = rng.normal(size=(len(y), d))
    X[np.arange(len(y)), y] += 3.0
    res = fit_probe(
        X,
        y,
        groups,
        n_splits=3,
        n_repeats=1,
        Cs=SMALL_CS,
        n_permutations=9,
        n_random_directions=2,
        seed=1,
    )
    assert (
        res.primary_metric == "balanced_accuracy"
        and res.permutation["metric"] == "balanced_accuracy"
    )
    assert res.positive_class is None and res.classes == list(range(k))
    ba = res.metrics["balanced_accuracy"]
    assert ba["mean"] > 0.6 and ba["ci_low"] > 0.2
    assert res.chance["balanced_accuracy"] == pytest.approx(0.2)
    assert res.permutation["p_value"] == pytest.approx(0.1)  # 1/(1+9): the smallest possible
    assert np.asarray(res.coef).shape == (k, d) and len(res.intercept) == k
    # metrics equal scikit-learn's multi-class definitions on the same folds
    folds = np.asarray(res.fold_ids[0])
    for f in range(3):
        test = folds == f
        proba, pred = _by_hand(X, y, ~test, test, res.fold_C[f])
        got = {m: res.fold_scores[m][f] for m in METRICS}
        assert got["balanced_accuracy"] == pytest.approx(
            balanced_accuracy_score(y[test], pred), abs=1e-12
        )
        assert got["auroc"] == pytest.approx(
            roc_auc_score(y[test], proba, multi_class="ovr"), abs=1e-12
        )
        assert got["f1"] == pytest.approx(f1_score(y[test], pred, average="macro"), abs=1e-12)
    rows = summary_rows(res, layer=2)
    assert [r["primary"] for r in rows] == [m == "balanced_accuracy" for m in METRICS]
    ba_row = rows[METRICS.index("balanced_accuracy")]
    assert ba_row["baseline"] == pytest.approx(0.2)


# ------------------------------------------------------------------------------ bookkeeping


def test_deterministic_json():
    X, y, groups = _planted_binary(5, d=4)
    kw = dict(
        n_splits=3, n_repeats=2, Cs=SMALL_CS, n_permutations=5, n_random_directions=3, seed=11
    )
    a = fit_probe(X, y, groups, **kw).to_json(sort_keys=True)
    b = fit_probe(X, y, groups, **kw).to_json(sort_keys=True)
    assert a == b
    c = fit_probe(X, y, groups, **{**kw, "seed": 12}).to_dict()
    assert c["folds_sha256"] != json.loads(a)["folds_sha256"]


def test_saved_direction_reproduces_decision_function():
    X, y, groups = _planted_binary(2, d=5)
    X = 3.0 * X + 7.0  # non-trivial scaler mean and scale
    res = fit_probe(
        X, y, groups, n_splits=3, n_repeats=1, Cs=SMALL_CS, n_permutations=0, n_random_directions=0
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(C=res.C, max_iter=res.max_iter)).fit(
        X, y
    )
    want = model.decision_function(X)
    w, b = np.asarray(res.coef), np.asarray(res.intercept)
    np.testing.assert_allclose(X @ w.T + b, want[:, None], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(res.decision_function(X), want, rtol=1e-9, atol=1e-9)
    # multi-class: one row per class, reproduces the (n, k) decision_function
    rng = np.random.default_rng(0)
    y3 = np.repeat([0, 1, 2], 10)
    X3 = rng.normal(size=(30, 4)) * 2 - 1
    X3[np.arange(30), y3] += 2
    r3 = fit_probe(
        X3, y3, n_splits=3, n_repeats=1, Cs=(1.0,), n_permutations=0, n_random_directions=0
    )
    m3 = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=r3.max_iter)).fit(
        X3, y3
    )
    np.testing.assert_allclose(
        r3.decision_function(X3), m3.decision_function(X3), rtol=1e-9, atol=1e-9
    )


def test_to_dict_is_strict_json_and_summary_rows():
    rng = np.random.default_rng(4)
    y = np.repeat([0, 1], 12)
    groups = np.r_[np.repeat(np.arange(6), 2), np.repeat(np.arange(6), 2)]  # mixed-label groups
    X = rng.normal(size=(24, 3))
    res = fit_probe(
        X, y, groups, n_splits=3, n_repeats=1, Cs=(1.0,), n_permutations=4, n_random_directions=2
    )
    assert res.permutation["scheme"] == "rows"
    text = json.dumps(res.to_dict(), allow_nan=False)
    assert json.loads(text)["classes"] == [0, 1]
    rows = summary_rows(res, model="m", dataset="d", layer=3, component="resid", pooling="last")
    assert [r["metric"] for r in rows] == list(METRICS)
    for r in rows:
        assert (r["model"], r["dataset"], r["layer"], r["component"], r["pooling"]) == (
            "m",
            "d",
            3,
            "resid",
            "last",
        )
        assert json.loads(r["n_per_class"]) == {"0": 12, "1": 12}
        for col in (
            "mean",
            "std",
            "ci_low",
            "ci_high",
            "n",
            "chance",
            "p_permutation",
            "interpretation",
        ):
            assert col in r
        if r["metric"] == "auroc":
            assert r["primary"] and r["p_permutation"] == res.permutation["p_value"]
        else:
            assert r["p_permutation"] is None
    assert rows[0]["majority"] == pytest.approx(0.5) and rows[0]["chance"] == pytest.approx(0.5)
    assert summary_rows(res.to_dict(), layer=3) == summary_rows(res, layer=3)
    with pytest.raises(ValueError, match="clash"):
        summary_rows(res, metric="x")


def test_interpret_rules():
    assert interpret(0.70, 0.90) == "direction exists"
    assert interpret(0.60, 0.90) == "weak"
    assert interpret(0.65, 0.90) == "weak"  # strict: ci_low must exceed 0.65
    assert interpret(0.40, 0.54) == "no linear signal"
    assert interpret(0.45, 0.60) == "inconclusive"
    assert interpret(0.50, 0.99) == "inconclusive"  # a high mean alone is not enough
    assert interpret(float("nan"), float("nan")) == "inconclusive"
    assert interpret(None, None) == "inconclusive"
    assert interpret(0.60, 0.70, thresholds=(0.6, 0.8)) == "inconclusive"
    # chance-shifted thresholds (5 classes: chance 0.2 -> 0.25 / 0.35)
    assert interpret(0.40, 0.60, chance=0.2) == "direction exists"
    assert interpret(0.30, 0.60, chance=0.2) == "weak"
    assert interpret(0.10, 0.24, chance=0.2) == "no linear signal"
    with pytest.raises(ValueError):
        interpret(0.7, 0.6)
    with pytest.raises(ValueError):
        interpret(0.5, 0.6, thresholds=(0.7, 0.6))


def test_majority_and_chance_baselines():
    X, y, groups = _planted_binary(6, n_pairs=(15, 10), d=3)  # 30 positive vs 20 negative rows
    res = fit_probe(
        X, y, groups, n_splits=3, n_repeats=1, Cs=(1.0,), n_permutations=0, n_random_directions=0
    )
    assert res.n_per_class == {"0": 20, "1": 30}
    assert res.majority == pytest.approx(
        {"accuracy": 0.6, "balanced_accuracy": 0.5, "auroc": 0.5, "f1": 0.75}
    )
    assert res.chance == pytest.approx(
        {"accuracy": 0.52, "balanced_accuracy": 0.5, "auroc": 0.5, "f1": 0.6}
    )


def test_cross_dataset_matrix():
    rng = np.random.default_rng(8)

    def make(shift_dim, n=30):
        y = np.repeat([0, 1], n // 2)
        X = rng.normal(size=(n, 4))
        X[:, shift_dim] += 3.0 * y
        return X, y

    data = {"a": make(0), "b": make(0), "c": make(1)}
    mat = cross_dataset_matrix(data, metric="auroc", n_splits=3, n_repeats=1, Cs=SMALL_CS, seed=0)
    assert list(mat.index) == ["a", "b", "c"] and list(mat.columns) == ["a", "b", "c"]
    assert mat.index.name == "train" and mat.columns.name == "test"
    diag = fit_probe(
        *data["a"], n_splits=3, n_repeats=1, Cs=SMALL_CS, n_permutations=0, n_random_directions=0
    )
    assert mat.loc["a", "a"] == pytest.approx(diag.metrics["auroc"]["mean"])
    assert mat.loc["a", "b"] > 0.9 and mat.loc["b", "a"] > 0.9  # shared direction transfers
    assert mat.loc["a", "c"] < 0.8  # a different direction does not
    with pytest.raises(ProbeInputError, match="classes"):
        cross_dataset_matrix({"a": data["a"], "z": (data["a"][0], data["a"][1] + 5)})


# ------------------------------------------------------------------------- fast internals


def test_fast_fold_ids_equal_sklearn_stratified_group_kfold():
    from layerscope.analysis import probes as P

    rng = np.random.default_rng(123)
    checked = 0
    for _ in range(400):
        k = int(rng.integers(2, 7))
        n_groups = int(rng.integers(2 * k, 30))
        mixed = rng.random() < 0.5
        y, groups = [], []
        for g in range(n_groups):
            size = int(rng.integers(1, 5))
            y += list(rng.integers(0, k, size)) if mixed else [g % k] * size
            groups += [5 + 3 * g] * size
        order = rng.permutation(len(y))
        y, groups = np.asarray(y)[order], np.asarray(groups)[order]
        n_splits, rs = int(rng.integers(2, 9)), int(rng.integers(0, 2**31))
        try:
            want = P._sgkf_fold_ids_sklearn(y, groups, n_splits, rs)
        except ValueError:
            assert P._sgkf_fold_ids(y, groups, n_splits, rs) is None
            continue
        np.testing.assert_array_equal(P._sgkf_fold_ids(y, groups, n_splits, rs), want)
        checked += 1
    assert checked > 300


@pytest.mark.parametrize("n,d,k", [(40, 60, 2), (30, 50, 4), (30, 3, 3), (40, 1, 2), (40, 1, 5)])
def test_batched_newton_solver_matches_sklearn(n, d, k):
    """The exact solver used for C selection and the controls reproduces scikit-learn's
    StandardScaler -> LogisticRegression(C) fitted to tight tolerance (both Gram/dual and
    primal feature paths, binary and multinomial, weak and strong regularisation)."""
    import warnings

    from layerscope.analysis import probes as P

    rng = np.random.default_rng(n * d + k)
    X = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=d) + 2.0
    y = np.arange(n) % k
    X[:, 0] += y
    X[:, -1] = 4.0  # a constant feature (scale 1, as in StandardScaler)
    Cs = np.array([0.001, 0.1, 1.0, 10.0, 100.0])
    train = np.ones((len(Cs), n), dtype=bool)
    for b in range(len(Cs)):
        train[b, rng.choice(n, n // 4, replace=False)] = False
    dec, conv = P._decision_batch(X, train, np.tile(y, (len(Cs), 1)), Cs, k)
    assert conv.all()
    for b, C in enumerate(Cs):
        model = make_pipeline(
            StandardScaler(), LogisticRegression(C=C, tol=1e-12, max_iter=100_000)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(X[train[b]], y[train[b]])
        np.testing.assert_allclose(
            P._proba_from_decision(dec[b]), model.predict_proba(X), atol=1e-4, rtol=0
        )


def test_sklearn_fallback_gives_the_same_result(monkeypatch):
    from layerscope.analysis import probes as P

    X, y, groups = _planted_binary(9, d=5)
    kw = dict(n_splits=3, n_repeats=1, Cs=SMALL_CS, n_permutations=5, n_random_directions=2, seed=2)
    fast = fit_probe(X, y, groups, **kw)
    monkeypatch.setattr(P, "_NEWTON_MAX_DIM", 0)  # every batched fit falls back to scikit-learn
    slow = fit_probe(X, y, groups, **kw)
    assert slow.n_fits == fast.n_fits
    assert slow.fold_C == fast.fold_C and slow.C == fast.C
    np.testing.assert_allclose(slow.permutation["scores"], fast.permutation["scores"], atol=1e-9)
    np.testing.assert_allclose(
        slow.random_directions["scores"], fast.random_directions["scores"], atol=1e-9
    )
