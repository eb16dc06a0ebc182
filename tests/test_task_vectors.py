"""Tests for layerscope.analysis.task_vectors on planted data with a known answer."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from layerscope.analysis import task_vectors as tv  # noqa: E402
from layerscope.data.h5cache import LayerStack  # noqa: E402
from layerscope.plotting import task_vectors as ptv  # noqa: E402

TASKS = ["minimum", "maximum", "sum", "difference", "product"]
PAIRS = ["25_9", "3_7", "12_4", "8_15", "6_6", "30_2"]
ONSET = 4


def planted(
    n_layers=8,
    d=32,
    seed=1,
    onset=ONSET,
    task_strength=3.0,
    pair_strength=2.0,
    noise=1.0,
    shuffle=False,
):
    """5 tasks x 6 pairs. Every layer: pair-dependent signal + noise (and a big common offset).

    From ``onset`` on, each task adds its own fixed direction (strength ``task_strength``).
    Prompts come in task-then-pair order unless ``shuffle``.
    """
    rng = np.random.default_rng(seed)
    tasks = [t for t in TASKS for _ in PAIRS]
    pairs = [p for _ in TASKS for p in PAIRS]
    n = len(tasks)
    task_dir = np.linalg.qr(rng.normal(size=(d, len(TASKS))))[0].T  # orthonormal task directions
    pair_sig = rng.normal(size=(len(PAIRS), d)) / np.sqrt(d) * pair_strength
    offset = rng.normal(size=d) * 10.0  # common component, removed by centring
    X = np.empty((n_layers, n, d))
    for L in range(n_layers):
        for i, (t, p) in enumerate(zip(tasks, pairs)):
            x = offset + pair_sig[PAIRS.index(p)] + rng.normal(size=d) / np.sqrt(d) * noise
            if L >= onset:
                x = x + task_strength * task_dir[TASKS.index(t)]
            X[L, i] = x
    ids = [f"{t}:{p}" for t, p in zip(tasks, pairs)]
    if shuffle:
        perm = rng.permutation(n)
        X = X[:, perm]
        tasks = [tasks[i] for i in perm]
        pairs = [pairs[i] for i in perm]
        ids = [ids[i] for i in perm]
    return X, list(range(n_layers)), tasks, pairs, ids


@pytest.fixture(scope="module")
def result():
    X, layers, tasks, pairs, ids = planted()
    return tv.task_vectors_by_layer((X, layers, tasks, pairs, ids), n_boot=400, seed=0)


# ------------------------------------------------------------------------------------------
# planted signal


def test_separation_jumps_at_onset(result):
    scores, _ = result
    sep = scores.set_index("layer")["separation"]
    assert sep[ONSET] > sep[ONSET - 1] + 0.3
    for L in range(ONSET):
        row = scores.loc[scores["layer"] == L].iloc[0]
        assert abs(row["separation"]) < 0.1
        assert row["separation_ci_low"] < 0.02 and row["separation_ci_high"] > -0.02  # covers ~0
    for L in range(ONSET, 8):
        row = scores.loc[scores["layer"] == L].iloc[0]
        assert row["separation_ci_low"] > 0.2  # excludes 0
    assert tv.best_layer(scores) >= ONSET
    # the paired layer-to-layer difference locates the onset
    d = scores.set_index("layer")
    assert d.loc[ONSET, "delta_prev_ci_low"] > 0
    for L in range(1, 8):
        if L != ONSET:
            assert d.loc[L, "delta_prev_ci_low"] < 0 < d.loc[L, "delta_prev_ci_high"]


def test_pair_signal_does_not_fake_task_separation():
    # Only pair signal everywhere: matched "between" (different pairs) gives ~0,
    # the unmatched definition is pushed below 0 by the shared pair signal.
    X, layers, tasks, pairs, _ = planted(onset=99, pair_strength=4.0)
    matched, _ = tv.task_vectors_by_layer((X, layers, tasks, pairs), n_boot=200)
    unmatched, _ = tv.task_vectors_by_layer((X, layers, tasks, pairs), n_boot=200, between="all")
    assert np.all(np.abs(matched["separation"]) < 0.08)
    assert np.all(unmatched["separation"] < -0.1)
    assert np.all(matched["pair_separation"] > 0.5)  # the pair itself is encoded


def test_norms_and_task_cosine_planted(result):
    scores, arrays = result
    long = tv.norms_long(scores)
    assert list(long.columns) == ["layer", "task", "norm", "rel_norm"]
    assert len(long) == 8 * 5
    early = long[long["layer"] < ONSET]["norm"]
    late = long[long["layer"] >= ONSET]["norm"]
    assert late.min() > 4 * early.max()
    # orthonormal task directions -> task vectors at a late layer are near the simplex (-1/(k-1))
    T = arrays["task_cosine"][6]
    off = T[~np.eye(5, dtype=bool)]
    assert np.allclose(np.diag(T), 1.0)
    assert np.all(np.abs(off + 0.25) < 0.15)


# ------------------------------------------------------------------------------------------
# matrices vs direct numpy


def test_geometry_matches_numpy_and_orders_by_task():
    X, layers, tasks, pairs, ids = planted(shuffle=True)
    g = tv.task_geometry(X[5], tasks, pairs, task_order=TASKS)
    order = g["order"]
    assert [tasks[i] for i in order] == [t for t in TASKS for _ in PAIRS]
    assert [pairs[i] for i in order][:6] == list(
        dict.fromkeys(pairs)
    )  # pairs in first-appearance order
    Xo = X[5][order]
    C = Xo - Xo.mean(axis=0)
    assert np.allclose(g["centred"], C)
    assert np.allclose(g["centred"].mean(axis=0), 0, atol=1e-10)
    U = C / np.linalg.norm(C, axis=1, keepdims=True)
    assert np.allclose(g["prompt_cosine"], U @ U.T)
    t = np.array([tasks[i] for i in order])
    V = np.stack([C[t == task].mean(axis=0) for task in TASKS])
    assert np.allclose(g["task_vectors"], V)
    assert np.allclose(g["task_norms"], np.linalg.norm(V, axis=1))
    Vn = V / np.linalg.norm(V, axis=1, keepdims=True)
    assert np.allclose(g["task_cosine"], Vn @ Vn.T)
    # means by brute force over unordered pairs of distinct prompts
    p = np.array([pairs[i] for i in order])
    S = U @ U.T
    within = [S[i, j] for i in range(30) for j in range(i + 1, 30) if t[i] == t[j] and p[i] != p[j]]
    between = [
        S[i, j] for i in range(30) for j in range(i + 1, 30) if t[i] != t[j] and p[i] != p[j]
    ]
    between_all = [S[i, j] for i in range(30) for j in range(i + 1, 30) if t[i] != t[j]]
    assert len(within) == 5 * 15 and len(between) == 10 * 30
    assert g["within"] == pytest.approx(np.mean(within))
    assert g["between"] == pytest.approx(np.mean(between))
    assert g["between_all"] == pytest.approx(np.mean(between_all))
    assert g["separation"] == pytest.approx(np.mean(within) - np.mean(between))


def test_ratio_only_for_positive_between():
    assert np.isnan(tv._ratios(0.3, -0.05)[0])
    assert np.isnan(tv._ratios(0.3, 0.0)[0])
    assert tv._ratios(0.3, 0.1)[0] == pytest.approx(3.0)
    assert tv._ratios(0.3, -0.05)[1] == pytest.approx(1.3 / 0.95)


def test_by_layer_matches_single_layer_and_layerstack():
    X, layers, tasks, pairs, ids = planted(shuffle=True)
    stack = LayerStack(
        X=X,
        layers=layers,
        prompt_ids=ids,
        labels=tasks,
        attrs={L: {"model": "toy"} for L in layers},
        groups=pairs,
    )
    scores, arrays = tv.task_vectors_by_layer(stack, n_boot=50, seed=3)
    g = tv.task_geometry(X[2], tasks, pairs)
    assert np.allclose(arrays["prompt_cosine"][2], g["prompt_cosine"])
    assert scores.loc[2, "separation"] == pytest.approx(g["separation"])
    assert arrays["prompt_ids"] == [ids[i] for i in arrays["order"]]
    assert arrays["meta"]["model"] == "toy"
    assert arrays["prompt_cosine"].shape == (8, 30, 30)
    assert arrays["task_vectors"].shape == (8, 5, 32)
    la = tv.layer_arrays(arrays, 2)
    assert np.array_equal(la["task_cosine"], arrays["task_cosine"][2])


# ------------------------------------------------------------------------------------------
# bootstrap


def test_bootstrap_deterministic_and_contains_estimate(result):
    X, layers, tasks, pairs, ids = planted()
    again = tv.task_vectors_by_layer((X, layers, tasks, pairs, ids), n_boot=400, seed=0)
    scores, arrays = result
    pd.testing.assert_frame_equal(scores, again[0])
    other = tv.task_vectors_by_layer((X, layers, tasks, pairs, ids), n_boot=400, seed=1)[0]
    assert not np.allclose(other["separation_ci_low"], scores["separation_ci_low"])
    assert np.all(scores["separation_ci_low"] <= scores["separation"])
    assert np.all(scores["separation"] <= scores["separation_ci_high"])
    assert np.all(scores["n_boot_valid"] == 400)


def test_bootstrap_all_ones_weights_equal_point_estimate():
    X, layers, tasks, pairs, _ = planted()
    g = tv.task_geometry(X[5], tasks, pairs)
    t = np.repeat(np.arange(5), 6)
    p = np.tile(np.arange(6), 5)
    bm = tv._boot_means(g["centred"], np.ones((1, 30)), tv._masks(t, p))
    assert bm["within"][0] == pytest.approx(g["within"])
    assert bm["between"][0] == pytest.approx(g["between"])
    bm = tv._boot_means(g["centred"], np.ones((1, 30)), tv._masks(t, p), recentre=True)
    assert bm["within"][0] == pytest.approx(g["within"])
    assert bm["between"][0] == pytest.approx(g["between"])


def test_bootstrap_duplicates_are_distinct_items_without_self_pairs():
    # Weighted result equals explicit replication of the drawn pairs with self-pairs excluded.
    X, layers, tasks, pairs, _ = planted()
    t = np.repeat(np.arange(5), 6)
    p = np.tile(np.arange(6), 5)
    C = X[6] - X[6].mean(axis=0)
    draw = np.array([0, 0, 0, 2, 5, 5])  # pair 0 three times, 1/3/4 missing
    counts = np.bincount(draw, minlength=6).astype(float)
    bm = tv._boot_means(C, counts[p][None, :], tv._masks(t, p), recentre=True)
    # explicit: copies of the drawn pairs as items; item identity = original prompt index
    idx = [i for g in draw for i in np.flatnonzero(p == g)]
    Y = X[6][idx]
    Y = Y - Y.mean(axis=0)
    U = Y / np.linalg.norm(Y, axis=1, keepdims=True)
    S = U @ U.T
    ti, pi, src = t[idx], p[idx], np.array(idx)
    m = len(idx)
    w = [
        S[a, b]
        for a in range(m)
        for b in range(a + 1, m)
        if src[a] != src[b] and ti[a] == ti[b] and pi[a] != pi[b]
    ]
    bt = [S[a, b] for a in range(m) for b in range(a + 1, m) if ti[a] != ti[b] and pi[a] != pi[b]]
    assert bm["within"][0] == pytest.approx(np.mean(w))
    assert bm["between"][0] == pytest.approx(np.mean(bt))
    # default (fixed centroid): same item scheme on the full-data cosine matrix
    fixed = tv._boot_means(C, counts[p][None, :], tv._masks(t, p))
    U0 = C / np.linalg.norm(C, axis=1, keepdims=True)
    S0 = (U0 @ U0.T)[np.ix_(idx, idx)]
    w0 = [
        S0[a, b]
        for a in range(m)
        for b in range(a + 1, m)
        if src[a] != src[b] and ti[a] == ti[b] and pi[a] != pi[b]
    ]
    assert fixed["within"][0] == pytest.approx(np.mean(w0))


def test_bootstrap_weights_resample_pairs():
    p = np.tile(np.arange(6), 5)
    W = tv.bootstrap_weights(p, 20, seed=7)
    assert W.shape == (20, 30)
    assert np.allclose(W.reshape(20, 5, 6).sum(axis=2), 6)  # 6 pairs drawn per task
    assert np.all(
        W.reshape(20, 5, 6) == W.reshape(20, 5, 6)[:, :1, :]
    )  # a pair moves with all tasks
    assert np.array_equal(W, tv.bootstrap_weights(p, 20, seed=7))


# ------------------------------------------------------------------------------------------
# best layer, PCA, input checks


def test_best_layer_tie_goes_to_earliest():
    s = pd.DataFrame({"layer": [0, 1, 2, 3], "separation": [0.1, 0.5, np.nan, 0.5]})
    assert tv.best_layer(s) == 1
    with pytest.raises(tv.TaskVectorError):
        tv.best_layer(pd.DataFrame({"layer": [0], "separation": [np.nan]}))


def test_pca_of_prompts(result):
    X, layers, tasks, pairs, _ = planted()
    pca = tv.pca_of_prompts(X[6], tasks)
    assert pca["coords"].shape == (30, 2)
    C = X[6] - X[6].mean(axis=0)
    ev = np.linalg.svd(C, compute_uv=False) ** 2
    assert np.allclose(pca["explained_variance_ratio"], ev[:2] / ev.sum())
    assert pca["task_coords"].shape == (5, 2)
    again = tv.pca_of_prompts(X[6], tasks)
    assert np.array_equal(pca["coords"], again["coords"])


def test_input_errors():
    X, layers, tasks, pairs, _ = planted()
    with pytest.raises(tv.TaskVectorError):
        tv.task_geometry(X[0], tasks[:-1], pairs)
    with pytest.raises(tv.TaskVectorError):
        tv.task_vectors_by_layer((X, layers[:-1], tasks, pairs))
    bad = X.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(tv.TaskVectorError):
        tv.task_vectors_by_layer((bad, layers, tasks, pairs))
    with pytest.raises(tv.TaskVectorError):
        tv.task_vectors_by_layer(
            LayerStack(X=X, layers=layers, prompt_ids=[""] * 30, labels=tasks, attrs={})
        )


# ------------------------------------------------------------------------------------------
# writers


def test_write_round_trip(result, tmp_path):
    scores, arrays = result
    h5 = tmp_path / "out" / "task_vectors.h5"
    csv = tmp_path / "out" / "task_vectors.csv"
    tv.write_task_vectors(
        result, h5, csv, attrs={"model": "toy", "dataset": "task_grid", "component": "resid_post"}
    )
    back = tv.read_task_vectors(h5)
    assert back["tasks"] == TASKS
    assert back["prompt_ids"] == arrays["prompt_ids"]
    assert np.array_equal(back["layers"], arrays["layers"])
    for key in ("prompt_cosine", "task_cosine", "task_vectors", "task_norms", "boot_separation"):
        assert np.allclose(back[key], arrays[key], equal_nan=True)
    assert back["attrs"]["model"] == "toy" and back["attrs"]["n_boot"] == 400
    table = pd.read_csv(csv)
    pd.testing.assert_frame_equal(table, scores, check_dtype=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "task_vectors.csv",
        "task_vectors.h5",
    ]


def test_write_is_atomic(result, tmp_path, monkeypatch):
    scores, arrays = result
    broken = dict(arrays)
    broken["task_vectors"] = arrays["task_vectors"][:2]  # IndexError half-way through the layers
    h5, csv = tmp_path / "tv.h5", tmp_path / "tv.csv"
    with pytest.raises(IndexError):
        tv.write_task_vectors((scores, broken), h5, csv)
    assert list(tmp_path.iterdir()) == []
    # an existing good file survives a failed rewrite
    tv.write_task_vectors(result, h5, csv)
    before = h5.read_bytes()
    with pytest.raises(IndexError):
        tv.write_task_vectors((scores, broken), h5, csv)
    assert h5.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tv.csv", "tv.h5"]


# ------------------------------------------------------------------------------------------
# plots


def _png_ok(path):
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img.std() > 0.01  # not blank


def test_plots_write_png_and_close(result, tmp_path):
    scores, arrays = result
    plt.close("all")
    meta = dict(model="toy-model", dataset="task_grid", component="resid_post")
    written = []
    written += ptv.plot_separation(scores, tmp_path / "sep.png", **meta)
    written += ptv.plot_norms(scores, tmp_path / "norms", **meta, formats=("png", "svg"))
    best = tv.best_layer(scores)
    la = tv.layer_arrays(arrays, best)
    written += ptv.plot_prompt_cosine(
        la["prompt_cosine"],
        la["prompt_tasks"],
        la["prompt_pairs"],
        tmp_path / "cos.png",
        layer=best,
        **meta,
    )
    written += ptv.plot_task_pca(
        la["centred"],
        la["prompt_tasks"],
        tmp_path / "pca.png",
        layer=best,
        pairs=la["prompt_pairs"],
        **meta,
    )
    names = sorted(p.name for p in written)
    assert names == ["cos.png", "norms.png", "norms.svg", "pca.png", "sep.png"]
    for p in written:
        if p.suffix == ".png":
            _png_ok(p)
    assert plt.get_fignums() == []
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary files left


def test_plot_failure_leaves_no_file(result, tmp_path):
    scores, _ = result
    plt.close("all")
    with pytest.raises(Exception):  # noqa: B017 (matplotlib's own error for an unknown format)
        ptv.plot_separation(scores, tmp_path / "sep", formats=("notaformat",))
    assert list(tmp_path.iterdir()) == []
    assert plt.get_fignums() == []
