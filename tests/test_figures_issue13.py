"""Figures a reviewer would flag (issue 13, item 8): two-class label means, multi-class metric axes,
probe-curve legends off the bands, and the generalization figure."""

import numpy as np
import pandas as pd
import pytest

from layerscope.plotting import plots


def _two_class(signal, n=60, d=80, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.array(["neg", "pos"] * (n // 2))
    X = rng.normal(size=(n, d))
    X[:, 0] += signal * (labels == "pos")
    return X, labels


def test_two_class_label_means_are_informative(tmp_path):
    X, labels = _two_class(0.0)
    # Random labels: the cross-fitted projection does not separate them (an in-sample one would).
    proj, classes = plots.mean_difference_projection(X, labels)
    gap = proj[labels == "pos"].mean() - proj[labels == "neg"].mean()
    assert classes == ["neg", "pos"] and abs(gap) < 0.5 * proj.std()
    X, labels = _two_class(3.0)
    proj, _ = plots.mean_difference_projection(X, labels)
    assert proj[labels == "pos"].mean() - proj[labels == "neg"].mean() > 2.0
    fig = plots._draw_mean_difference(X, labels)
    ax = fig.axes[0]
    assert (
        "difference of class means" in ax.get_xlabel() and len(ax.patches) > 4
    )  # histograms, not a 2x2 matrix
    out = plots.label_mean_matrix(X, labels, tmp_path / "lm.png")
    assert (tmp_path / "lm.png").stat().st_size > 5_000 and out == [str(tmp_path / "lm.png")]


def _summary(n_classes):
    rows = []
    for layer in range(4):
        rows.append(
            {
                "layer": layer,
                "metric": "auroc",
                "mean": 0.6 + 0.1 * layer,
                "ci_low": 0.2,
                "ci_high": 1.0,
                "component": "resid_post",
                "pooling": "mean",
                "chance": 0.5,
                "n_per_class": '{"' + '": 5, "'.join(f"c{i}" for i in range(n_classes)) + '": 5}',
            }
        )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("k, words", [(2, None), (5, "one-vs-rest, macro mean over 5 classes")])
def test_metric_axis_says_how_classes_are_averaged(k, words):
    fig = plots._draw_metric_vs_layer(_summary(k), metric="auroc")
    label = fig.axes[0].get_ylabel()
    assert label == "AUROC" if words is None else words in label


def test_probe_curve_legend_is_outside_the_axes():
    fig = plots._draw_metric_vs_layer(_summary(2), metric="auroc")
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_legend() is None and len(fig.legends) == 1
    box = fig.legends[0].get_window_extent()
    axes_box = ax.get_window_extent()
    assert box.y1 <= axes_box.y0 + 1  # below the plotting area: it cannot cover the bands


def test_generalization_intervals_diagonal_and_named_layer(tmp_path):
    from layerscope.jobs import stages as analysis

    rng = np.random.default_rng(1)
    rows, summaries = [], {}
    for name in ("a", "b"):
        s = []
        for layer in (1, 2):
            s.append(
                {
                    "layer": layer,
                    "metric": "auroc",
                    "component": "resid_post",
                    "pooling": "mean",
                    "mean": 0.7 + 0.1 * layer,
                    "ci_low": 0.6,
                    "ci_high": 0.95,
                }
            )
        summaries[name] = tmp_path / f"{name}_summary.csv"
        pd.DataFrame(s).to_csv(summaries[name], index=False)
    cells = analysis._summary_cells(summaries, "resid_post", "mean", "auroc")
    assert cells[("a", 2)] == {"value": pytest.approx(0.9), "ci_low": 0.6, "ci_high": 0.95}
    for layer, transfer in ((1, 0.8), (2, 0.6)):
        for train in ("a", "b"):
            for test in ("a", "b"):
                cell = (
                    cells[(train, layer)]
                    if train == test
                    else {
                        "value": transfer + rng.uniform(-0.01, 0.01),
                        "ci_low": transfer - 0.1,
                        "ci_high": transfer + 0.1,
                    }
                )
                rows.append(
                    {
                        "layer": layer,
                        "component": "resid_post",
                        "pooling": "mean",
                        "metric": "auroc",
                        "train": train,
                        "test": test,
                        "cross_validated": train == test,
                        **cell,
                    }
                )
    csv = tmp_path / "gen.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    layer = analysis.generalization_figure(csv, tmp_path / "gen.png", model="m", formats=["png"])
    assert layer == 1  # highest mean transfer, not the best diagonal
    fig = plots._draw_generalization_matrix(
        pd.DataFrame([[0.8, 0.7], [0.6, 0.9]], index=["a", "b"], columns=["a", "b"]),
        layer=1,
        intervals=(pd.DataFrame([[0.6, 0.5], [0.4, 0.8]]), pd.DataFrame([[0.9, 0.8], [0.7, 1.0]])),
        note="layer 1: the layer with the highest mean transfer AUROC",
    )
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "0.80\n[0.60, 0.90]" in texts and "highest mean transfer" in fig._suptitle.get_text()


def test_transfer_metric_has_a_bootstrap_interval():
    from layerscope.analysis.probes import transfer_metric

    rng = np.random.default_rng(0)
    y = np.array(["f", "t"] * 30)
    Xa = rng.normal(size=(60, 5))
    Xa[:, 0] += 2 * (y == "t")  # noqa: E702
    Xb = rng.normal(size=(60, 5))
    Xb[:, 0] += 2 * (y == "t")  # noqa: E702
    cell = transfer_metric((Xa, y, None), (Xb, y), n_boot=300, Cs=(1.0,))
    assert cell["ci_low"] < cell["value"] < cell["ci_high"] and cell["value"] > 0.8
