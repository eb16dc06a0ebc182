import itertools
import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

from layerscope.plotting import plots  # noqa: E402

RNG = np.random.default_rng(0)
N_LAYERS, N, D = 3, 24, 10
LABELS = np.array(["negative", "positive"] * (N // 2))
STACK = (
    RNG.normal(size=(N_LAYERS, N, D))
    + (LABELS == "positive")[None, :, None] * np.arange(N_LAYERS)[:, None, None]
)
LAYERS = [0, 4, 8]
NORMS = np.linalg.norm(STACK, axis=2).T  # [n_prompts, n_layers]


def _summary():
    rows = []
    for comp, pool in [("resid_post", "mean"), ("resid_post", "last")]:
        for L in LAYERS:
            m = 0.55 + 0.04 * L + (0.02 if pool == "mean" else 0)
            rows.append(
                dict(
                    model="m",
                    dataset="d",
                    layer=L,
                    component=comp,
                    pooling=pool,
                    metric="auroc",
                    mean=m,
                    ci_low=m - 0.05,
                    ci_high=m + 0.05,
                    chance=0.5,
                    baseline=0.5,
                )
            )
            rows.append(
                dict(
                    model="m",
                    dataset="d",
                    layer=L,
                    component=comp,
                    pooling=pool,
                    metric="accuracy",
                    mean=m,
                    ci_low=m - 0.05,
                    ci_high=m + 0.05,
                    chance=0.5,
                    baseline=0.6,
                )
            )
    return pd.DataFrame(rows)


def _depth_df():
    rows = []
    for model, nl in [("small", 4), ("large", 8)]:
        for L in range(nl):
            v = 0.6 + 0.3 * np.sin(np.pi * L / nl)
            rows.append(
                dict(model=model, n_layers=nl, layer=L, mean=v, ci_low=v - 0.03, ci_high=v + 0.03)
            )
    return pd.DataFrame(rows)


GEN = pd.DataFrame(
    [[0.9, 0.7], [0.6, 0.85]],
    index=pd.Index(["a", "b"], name="train"),
    columns=pd.Index(["a", "b"], name="test"),
)

CALLS = {
    "metric_vs_layer": lambda out, **kw: plots.metric_vs_layer(
        _summary(), out, metric="auroc", model="m", dataset="d", n_layers=12, **kw
    ),
    "pca_grid": lambda out, **kw: plots.pca_grid(
        STACK,
        LAYERS,
        LABELS,
        out,
        model="m",
        dataset="d",
        component="resid_post",
        pooling="mean",
        **kw,
    ),
    "tsne_grid": lambda out, **kw: plots.tsne_grid(
        STACK[:2],
        LAYERS[:2],
        LABELS,
        out,
        model="m",
        dataset="d",
        component="resid_post",
        pooling="mean",
        **kw,
    ),
    "cosine_heatmap": lambda out, **kw: plots.cosine_heatmap(
        STACK[2],
        LABELS,
        out,
        model="m",
        dataset="d",
        layer=8,
        component="resid_post",
        pooling="mean",
        **kw,
    ),
    "label_mean_matrix": lambda out, **kw: plots.label_mean_matrix(
        STACK[2], np.arange(N) % 3, out, model="m", dataset="d", layer=8, **kw
    ),
    "norm_heatmap": lambda out, **kw: plots.norm_heatmap(
        NORMS, LAYERS, LABELS, out, model="m", dataset="d", **kw
    ),
    "norm_curves": lambda out, **kw: plots.norm_curves(
        NORMS, LAYERS, LABELS, out, model="m", dataset="d", **kw
    ),
    "generalization_matrix": lambda out, **kw: plots.generalization_matrix(
        GEN, out, metric="auroc", layer=8, model="m", **kw
    ),
    "best_layer_vs_depth": lambda out, **kw: plots.best_layer_vs_depth(
        _depth_df(), out, metric="auroc", dataset="d", **kw
    ),
}


@pytest.fixture(autouse=True)
def _no_open_figures():
    yield
    assert plt.get_fignums() == []


def _check_png(path):
    assert os.path.getsize(path) > 5000
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert 300 <= h <= 6000 and 300 <= w <= 6000, (h, w)
    assert img.std() > 0.01  # not a blank canvas


@pytest.mark.parametrize("name", sorted(CALLS))
def test_each_plot_writes_a_png(name, tmp_path):
    out = tmp_path / "fig" / f"{name}.png"
    written = CALLS[name](out)
    assert written == [str(out)]
    _check_png(out)
    assert sorted(os.listdir(out.parent)) == [out.name]  # no temporary files left


def test_extra_formats_same_stem(tmp_path):
    written = CALLS["generalization_matrix"](tmp_path / "gen.png", formats=("png", "svg", "pdf"))
    assert written == [str(tmp_path / f"gen.{ext}") for ext in ("png", "svg", "pdf")]
    assert sorted(os.listdir(tmp_path)) == ["gen.pdf", "gen.png", "gen.svg"]
    assert (tmp_path / "gen.pdf").read_bytes().startswith(b"%PDF")
    assert b"<svg" in (tmp_path / "gen.svg").read_bytes()[:2000]
    _check_png(tmp_path / "gen.png")


def test_output_is_deterministic(tmp_path):
    a = CALLS["norm_curves"](tmp_path / "a.svg", formats=("pdf",))
    b = CALLS["norm_curves"](tmp_path / "b.svg", formats=("pdf",))
    for x, y in zip(a, b):
        assert open(x, "rb").read() == open(y, "rb").read()


def test_target_paths():
    assert plots._targets("x/fig", ("png",)) == [plots.Path("x/fig.png")]
    assert plots._targets("fig.pdf", ("png", "svg")) == [
        plots.Path(p) for p in ("fig.pdf", "fig.png", "fig.svg")
    ]
    with pytest.raises(ValueError):
        plots._targets("fig.docx", ("png",))
    with pytest.raises(ValueError):
        plots._targets("fig.png", ("gif",))


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(self, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(RuntimeError):
        CALLS["norm_curves"](tmp_path / "n.png")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# legibility


def _visible_ticklabels(axis):
    return [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]


def _assert_no_overlap(fig, axis):
    renderer = fig.canvas.get_renderer()
    labels = _visible_ticklabels(axis)
    boxes = [t.get_window_extent(renderer) for t in labels]
    for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
        assert not a.overlaps(b), (
            f"tick labels {labels[i].get_text()!r} and {labels[j].get_text()!r} overlap"
        )
    return labels


def _assert_inside(fig, texts):
    renderer = fig.canvas.get_renderer()
    W, H = fig.canvas.get_width_height()
    for t in texts:
        bb = t.get_window_extent(renderer)
        assert bb.x0 >= -1 and bb.y0 >= -1 and bb.x1 <= W + 1 and bb.y1 <= H + 1, (
            f"{t.get_text()!r} clipped"
        )


def _secondary(ax):
    return [a for a in ax.child_axes if type(a).__name__ == "SecondaryAxis"]


LONG25 = [f"label_{i:02d}_abcdefghijkl" for i in range(25)]  # 20 characters each
IDS25 = [f"prompt_{i:02d}_{'x' * 12}" for i in range(25)]


def test_cosine_heatmap_25_long_labels_do_not_overlap():
    X = np.random.default_rng(1).normal(size=(25, 12))
    fig = plots._draw_cosine_heatmap(X, LONG25, prompt_ids=IDS25, model="m", dataset="d", layer=3)
    fig.canvas.draw()
    ax = fig.axes[0]
    ys = _assert_no_overlap(fig, ax.yaxis)
    assert [t.get_text() for t in ys] == LONG25  # every label shown, none thinned away
    xs = _assert_no_overlap(fig, ax.xaxis)
    assert len(xs) == 25
    ids = _secondary(ax)
    assert ids, "prompt ids missing"
    assert [t.get_text() for t in _assert_no_overlap(fig, ids[0].yaxis)] == IDS25
    _assert_inside(fig, ys + xs)


def test_norm_heatmap_25_long_labels_do_not_overlap():
    N = np.abs(np.random.default_rng(2).normal(size=(25, 6))) + 1
    fig = plots._draw_norm_heatmap(
        N, list(range(6)), LONG25[::-1], prompt_ids=IDS25, model="m", dataset="d"
    )
    fig.canvas.draw()
    band = fig.axes[0]
    ys = _assert_no_overlap(fig, band.yaxis)
    assert [t.get_text() for t in ys] == LONG25  # sorted by label
    _assert_inside(fig, ys)
    ids = _secondary(fig.axes[1])
    assert ids and len(_assert_no_overlap(fig, ids[0].yaxis)) == 25


def test_many_rows_are_thinned_not_overlapping():
    labels = [f"a rather long label that will be cut {i:03d}" for i in range(150)]
    X = np.random.default_rng(3).normal(size=(150, 8))
    fig = plots._draw_cosine_heatmap(X, labels)
    fig.canvas.draw()
    ys = _assert_no_overlap(fig, fig.axes[0].yaxis)
    assert 10 < len(ys) < 150
    assert all(
        len(t.get_text()) <= plots.MAX_LABEL_CHARS and t.get_text().endswith("\u2026") for t in ys
    )
    _assert_no_overlap(fig, fig.axes[0].xaxis)
    assert fig.get_figheight() <= plots._HEATMAP_MAX_SIDE + 6


def test_shorten():
    assert plots.shorten("abc", 5) == "abc"
    assert plots.shorten("abcdefgh", 5) == "abcd\u2026"
    assert plots.shorten(12345678, 5) == "1234\u2026"


def test_palette():
    assert plots.palette(2) == plots.OKABE_ITO[:2]
    assert len(set(plots.palette(10))) == 10
    assert len(set(map(tuple, plots.palette(20)))) == 20
    assert len(plots.palette(45)) == 45


# ------------------------------------------------------------------------------------------------
# content


def test_pca_axis_labels_match_sklearn():
    fig = plots._draw_pca_grid(
        STACK, LAYERS, LABELS, model="m", dataset="d", component="c", pooling="p"
    )
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_xlabel()]
    assert len(panels) == N_LAYERS
    for k, ax in enumerate(panels):
        ratio = PCA(n_components=2).fit(STACK[k]).explained_variance_ratio_
        assert ax.get_xlabel() == f"PC1 ({100 * ratio[0]:.1f}% var)"
        assert ax.get_ylabel() == f"PC2 ({100 * ratio[1]:.1f}% var)"
        assert ax.get_title() == f"layer {LAYERS[k]}"
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend_texts == ["negative (n=12)", "positive (n=12)"]
    assert "m" in fig._suptitle.get_text() and "c / p pooling" in fig._suptitle.get_text()


def test_pca_grid_limits_panels():
    X = np.random.default_rng(0).normal(size=(10, 12, 4))
    fig = plots._draw_pca_grid(X, list(range(10)), [0, 1] * 6, max_panels=4)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert titles == ["layer 0", "layer 3", "layer 6", "layer 9"]
    assert "4 of 10 layers" in fig._suptitle.get_text()


def test_tsne_perplexity():
    assert plots.tsne_perplexity(1000) == 30
    assert plots.tsne_perplexity(31) == pytest.approx(10)
    assert plots.tsne_perplexity(4) == 1


def test_centered_cosine_matches_numpy():
    X = np.random.default_rng(4).normal(size=(7, 5)) + 3
    Xc = X - X.mean(axis=0)
    expect = (Xc @ Xc.T) / np.outer(np.linalg.norm(Xc, axis=1), np.linalg.norm(Xc, axis=1))
    np.testing.assert_allclose(plots.centered_cosine(X), expect, atol=1e-12)
    # a row equal to the centroid gives zeros, not NaN
    Y = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])
    S = plots.centered_cosine(Y)
    assert np.isfinite(S).all() and S[2].tolist() == [0.0, 0.0, 0.0]


def test_cosine_heatmap_orders_by_label_stably():
    X = np.random.default_rng(5).normal(size=(6, 4))
    labels = ["b", "a", "b", "a", "c", "a"]
    fig = plots._draw_cosine_heatmap(X, labels)
    shown = np.asarray(fig.axes[0].images[0].get_array())
    order = [1, 3, 5, 0, 2, 4]  # a's in original order, then b's, then c
    np.testing.assert_allclose(shown, plots.centered_cosine(X)[np.ix_(order, order)])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["a", "b", "c"]
    np.testing.assert_allclose(fig.axes[0].get_yticks(), [1.0, 3.5, 5.0])
    assert fig.axes[0].images[0].norm.vmin == -1 and fig.axes[0].images[0].norm.vmax == 1


def test_label_mean_cosine_matches_numpy():
    X = np.random.default_rng(6).normal(size=(9, 4))
    labels = np.array([2, 0, 1, 0, 1, 2, 2, 0, 1])
    M, classes = plots.label_mean_cosine(X, labels)
    assert classes == [0, 1, 2]
    Xc = X - X.mean(0)
    means = np.stack([Xc[labels == c].mean(0) for c in classes])
    U = means / np.linalg.norm(means, axis=1, keepdims=True)
    np.testing.assert_allclose(M, U @ U.T, atol=1e-12)
    fig = plots._draw_label_mean_matrix(X, labels)
    values = [t.get_text() for t in fig.axes[0].texts]
    assert values == [f"{v:.2f}" for v in M.ravel()]


def test_metric_vs_layer_content():
    fig = plots._draw_metric_vs_layer(
        _summary(), metric="accuracy", model="m", dataset="d", n_layers=12
    )
    ax = fig.axes[0]
    legend = fig.legends[0]  # below the axes, off the interval bands (issue 13)
    texts = [t.get_text() for t in legend.get_texts()]
    assert "resid_post / last  (best: layer 8, 0.870)" in texts
    assert "resid_post / mean  (best: layer 8, 0.890)" in texts
    assert "chance (0.50)" in texts and "majority baseline (0.60)" in texts and "95% CI" in texts
    assert ax.get_ylabel() == "accuracy" and ax.get_xlabel() == "layer"
    assert "m" in ax.get_title() and "d" in ax.get_title()
    assert any("relative depth" in c.get_xlabel() for c in ax.child_axes)
    assert ax.get_ylim()[1] <= 1.01


def test_norm_curves_say_which_band():
    fig = plots._draw_norm_curves(NORMS, LAYERS, LABELS, spread="iqr")
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("interquartile" in t for t in texts)
    fig = plots._draw_norm_curves(NORMS, LAYERS, LABELS)
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("1 SD" in t for t in texts)
    with pytest.raises(ValueError):
        plots._draw_norm_curves(NORMS, LAYERS, LABELS, spread="mad")


def test_generalization_matrix_annotations():
    fig = plots._draw_generalization_matrix(GEN, metric="auroc", layer=3, model="m")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["0.90", "0.70", "0.60", "0.85"]
    assert ax.get_ylabel() == "train dataset" and ax.get_xlabel() == "test dataset"
    assert "layer 3" in fig._suptitle.get_text()


def test_best_layer_vs_depth_modes():
    df = _depth_df()
    fig = plots._draw_best_layer_vs_depth(df, metric="auroc", dataset="d")
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert texts[0] == "small (best: layer 2/4, 0.900)" and "best layer" in texts
    best = df.loc[df.groupby("model")["mean"].idxmax()]
    fig = plots._draw_best_layer_vs_depth(best, metric="auroc", chance=0.5)
    assert fig.axes[0].get_xlabel() == "relative depth (layer / n_layers)"
    assert "chance (0.50)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    np.testing.assert_allclose(plots.relative_depth([2, 4], 8), [0.25, 0.5])


def test_best_layer_vs_depth_says_how_classes_are_averaged():
    df = _depth_df()
    df["n_per_class"] = '{"a": 5, "b": 5, "c": 5}'
    fig = plots._draw_best_layer_vs_depth(df, metric="auroc", dataset="d")
    assert fig.axes[0].get_ylabel() == "AUROC (one-vs-rest, macro mean over 3 classes)"
    df["n_per_class"] = '{"a": 5, "b": 5}'
    assert (
        plots._draw_best_layer_vs_depth(df, metric="auroc", dataset="d").axes[0].get_ylabel()
        == "AUROC"
    )
