import numpy as np
import pandas as pd
import pytest

from layerscope.analysis.stats import COLUMNS, StatsInputError, activation_stats, prompt_norms
from layerscope.data.h5cache import LayerData, LayerStack


@pytest.fixture
def data():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(3, 10, 6)).astype(np.float32)
    X[:, :, 0] = 0.0  # exactly zero feature -> near-zero fraction is at least 1/6
    X[1, 2, 3] = 5e-4  # below the default threshold
    labels = ["neg", "pos", "pos", "neg", "pos", "neg", "neg", "pos", "pos", "pos"]
    return X, [2, 5, 9], labels


def _expected(x):
    x = np.asarray(x, dtype=np.float64)
    return {
        "mean": x.mean(),
        "std": x.std(),
        "min": x.min(),
        "max": x.max(),
        "mean_l2_norm": np.mean(np.sqrt((x**2).sum(axis=1))),
        "frac_near_zero": np.mean(np.abs(x) < 1e-3),
    }


def test_label_rows_match_numpy(data):
    X, layers, labels = data
    df = activation_stats(
        {L: X[k] for k, L in enumerate(layers)}, labels, component="resid_post", pooling="mean"
    )
    assert list(df.columns) == COLUMNS
    assert sorted(df["layer"].unique()) == layers
    y = np.array(labels)
    for k, L in enumerate(layers):
        for lab in ("neg", "pos"):
            row = df[(df.layer == L) & (df.label == lab)].iloc[0]
            exp = _expected(X[k][y == lab])
            for col, v in exp.items():
                assert row[col] == pytest.approx(v, rel=1e-9, abs=1e-12), col
            assert row["n"] == int(np.sum(y == lab))
            assert (
                row["kind"] == "label"
                and row["component"] == "resid_post"
                and row["pooling"] == "mean"
            )
            assert np.isnan(row["mean_diff_l2"])
        row = df[(df.layer == L) & (df.label == "<all>")].iloc[0]
        assert row["n"] == 10
        assert row["mean"] == pytest.approx(X[k].astype(np.float64).mean())
    assert df[(df.layer == 5) & (df.label == "<all>")]["frac_near_zero"].iloc[0] == pytest.approx(
        11 / 60
    )


def test_binary_diff_row_is_positive_minus_negative(data):
    X, layers, labels = data
    df = activation_stats(
        LayerStack(
            X=X, layers=layers, prompt_ids=[str(i) for i in range(10)], labels=labels, attrs={}
        ),
        component="c",
        pooling="p",
    )
    y = np.array(labels)
    for k, L in enumerate(layers):
        d = df[(df.layer == L) & (df.kind == "diff")]
        assert len(d) == 1
        d = d.iloc[0]
        assert d["label"] == "<diff>" and d["contrast"] == "pos - neg" and d["n"] == 10
        pos, neg = _expected(X[k][y == "pos"]), _expected(X[k][y == "neg"])
        for col in pos:
            assert d[col] == pytest.approx(pos[col] - neg[col], abs=1e-12), col
        Xk = X[k].astype(np.float64)
        assert d["mean_diff_l2"] == pytest.approx(
            np.linalg.norm(Xk[y == "pos"].mean(0) - Xk[y == "neg"].mean(0))
        )


def test_positive_class_flips_the_contrast(data):
    X, layers, labels = data
    a = activation_stats(X, labels, component="c", pooling="p")
    b = activation_stats(X, labels, component="c", pooling="p", positive_class="neg")
    da, db = a[a.kind == "diff"].reset_index(), b[b.kind == "diff"].reset_index()
    assert (db["contrast"] == "neg - pos").all()
    np.testing.assert_allclose(da["mean"], -db["mean"])
    np.testing.assert_allclose(da["mean_diff_l2"], db["mean_diff_l2"])
    with pytest.raises(StatsInputError):
        activation_stats(X, labels, component="c", pooling="p", positive_class="maybe")


def test_multiclass_one_vs_rest(data):
    X, layers, _ = data
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    df = activation_stats(X, labels, component="c", pooling="p")
    d = df[(df.layer == 1) & (df.kind == "diff")]
    assert list(d["label"]) == ["<diff:0>", "<diff:1>", "<diff:2>"]
    assert list(d["contrast"]) == ["0 - rest", "1 - rest", "2 - rest"]
    Xk = X[1].astype(np.float64)
    for c in (0, 1, 2):
        row = d[d.label == f"<diff:{c}>"].iloc[0]
        inn, out = _expected(Xk[labels == c]), _expected(Xk[labels != c])
        assert row["std"] == pytest.approx(inn["std"] - out["std"])
        assert row["mean_diff_l2"] == pytest.approx(
            np.linalg.norm(Xk[labels == c].mean(0) - Xk[labels != c].mean(0))
        )
    # labels are stored as strings so they can share the column with the special rows
    assert set(df[df.kind == "label"]["label"]) == {"0", "1", "2"}


def test_containers_agree_and_layer_data_labels(data):
    X, layers, labels = data
    as_dict = activation_stats(
        {L: X[k] for k, L in enumerate(layers)}, labels, component="c", pooling="p"
    )
    lds = {
        L: LayerData(X=X[k], prompt_ids=[], labels=labels, attrs={"layer": L})
        for k, L in enumerate(layers)
    }
    as_ld = activation_stats(lds, component="c", pooling="p")  # labels from the LayerData
    pd.testing.assert_frame_equal(as_dict, as_ld)
    as_arr = activation_stats(X, labels, component="c", pooling="p")
    assert sorted(as_arr["layer"].unique()) == [0, 1, 2]
    np.testing.assert_allclose(as_arr["mean"].to_numpy(), as_dict["mean"].to_numpy())


def test_near_zero_threshold(data):
    X, _, labels = data
    df = activation_stats(X, labels, component="c", pooling="p", near_zero=0.0)
    assert (df[df.kind != "diff"]["frac_near_zero"] == 0).all()


def test_bad_inputs(data):
    X, _, labels = data
    with pytest.raises(StatsInputError):
        activation_stats(X, labels[:-1], component="c", pooling="p")
    with pytest.raises(StatsInputError):
        activation_stats({0: X[0], 1: X[1][:5]}, labels, component="c", pooling="p")
    bad = X.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(StatsInputError):
        activation_stats(bad, labels, component="c", pooling="p")
    with pytest.raises(StatsInputError):
        prompt_norms(X[0])


def test_prompt_norms(data):
    X, layers, _ = data
    N = prompt_norms(
        {L: X[k] for k, L in reversed(list(enumerate(layers)))}
    )  # order of the dict is irrelevant
    assert N.shape == (10, 3) and N.dtype == np.float64
    np.testing.assert_allclose(N, np.sqrt((X.astype(np.float64) ** 2).sum(axis=2)).T)
    big = np.full((1, 2, 4), 300.0, dtype=np.float16)  # 300**2 overflows float16
    np.testing.assert_allclose(prompt_norms(big), [[600.0], [600.0]])
