"""Stage glue on real cached layer files from a tiny model: probes, summary, figures, task
vectors."""

import json

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from devkit.tiny_models import build_tiny_model
from layerscope.analysis.layer_index import write_layer_index
from layerscope.engine.store import cache_from_table, extract_layer
from layerscope.jobs import stages as analysis
from layerscope.jobs.probe_runs import summarize_probes, train_layer_probes

LAYERS = [0, 1]
SETTINGS = {"n_splits": 3, "n_repeats": 1, "n_permutations": 5, "n_random_directions": 3, "seed": 0}


def _table(path, rows):
    pd.DataFrame(rows, columns=["prompt_id", "text", "label", "group"]).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """Two binary datasets and one task grid, cached through the same code the rules run."""
    root = tmp_path_factory.mktemp("analysis")
    model = build_tiny_model(root / "model", "gpt2", n_layers=2, d_model=16)
    words = ["Paris", "Rome", "Berlin", "Madrid", "Oslo", "Lima", "Cairo", "Quito"]
    datasets = {
        "a": [
            (f"a{i}", f"The city is {w}", "true" if i % 2 else "false", f"g{i // 2}")
            for i, w in enumerate(words)
        ],
        "b": [
            (f"b{i}", f"I visited {w} again", "true" if i % 2 else "false", f"g{i}")
            for i, w in enumerate(words)
        ],
        "grid": [
            (f"{t}:{a}_{b}", f"Given {a} and {b} calculate the {t}", t, f"{a}_{b}")
            for t in ("sum", "product", "minimum")
            for a, b in ((25, 9), (42, 11), (7, 3))
        ],
    }
    layer_files = {}
    for name, rows in datasets.items():
        table = _table(root / f"{name}.csv", rows)
        store = root / name / "store.h5"
        cache_from_table(
            table,
            store,
            model={"source": str(model), "dtype": "float32", "bos": "auto"},
            activations={"components": ["resid_post"], "poolings": ["mean", "last"]},
            log=None,
        )
        layer_files[name] = [
            extract_layer(store, layer, root / name / f"layer_{layer}.h5") for layer in LAYERS
        ]
    return root, layer_files


def _probe_summary(root, layer_files, name):
    jsons = []
    for path in layer_files[name]:
        out = root / name / f"probe_{path.stem}.json"
        train_layer_probes(
            path,
            out,
            model="tiny",
            dataset=name,
            settings=SETTINGS,
            positive="true",
            log=lambda m: None,
        )
        jsons.append(out)
    return summarize_probes(jsons, root / name / "summary.csv"), jsons


def test_probe_jobs_summary_and_index(cached):
    root, files = cached
    summary, jsons = _probe_summary(root, files, "a")
    assert sorted(summary.layer.unique()) == LAYERS
    assert set(zip(summary.component, summary.pooling)) == {
        ("resid_post", "mean"),
        ("resid_post", "last"),
    }
    for col in (
        "model",
        "dataset",
        "layer",
        "component",
        "pooling",
        "metric",
        "mean",
        "std",
        "ci_low",
        "ci_high",
        "n",
        "n_per_class",
        "chance",
        "p_permutation",
        "interpretation",
    ):
        assert col in summary.columns
    doc = json.loads(jsons[0].read_text())
    assert doc["layer"] == 0 and len(doc["probes"]) == 2
    assert doc["probes"][0]["result"]["classes"][-1] == "true"
    # every row says which class its direction points towards (issue 23)
    assert (summary["positive_class"] == "true").all()
    index = write_layer_index(files["a"], root / "a" / "layers.csv")
    assert list(index.layer.unique()) == LAYERS and (index.n_prompts == 8).all()


def test_best_layer_ties_go_to_the_earliest():
    s = pd.DataFrame(
        {
            "metric": "auroc",
            "component": "c",
            "pooling": "p",
            "layer": [3, 1, 2],
            "mean": [0.9, 0.9, 0.5],
        }
    )
    assert analysis.best_layer(s, metric="auroc", component="c", pooling="p") == 1


def test_geometry_stats_generalization_and_depth_figures(cached, tmp_path):
    root, files = cached
    _probe_summary(root, files, "a")
    _probe_summary(root, files, "b")
    out = {
        name: tmp_path / f"{name}.png"
        for name in ("pca", "cosine", "label_means", "norm_heatmap", "norm_curves")
    }
    info = analysis.geometry_figures(
        files["a"],
        root / "a" / "summary.csv",
        out,
        component="resid_post",
        pooling="mean",
        metric="auroc",
        model="tiny",
        dataset="a",
        formats=["png", "svg"],
    )
    assert info["best_layer"] in LAYERS
    for path in out.values():
        assert imread(path).shape[0] > 200
        assert path.with_suffix(".svg").exists()
    stats = analysis.activation_stats_table(files["a"], tmp_path / "stats.csv", positive="true")
    assert {"<diff>", "true", "false"} <= set(stats.label)
    table = analysis.generalization(
        {"a": files["a"], "b": files["b"]},
        tmp_path / "gen.csv",
        tmp_path / "gen.png",
        component="resid_post",
        pooling="mean",
        metric="auroc",
        model="tiny",
        group="ab",
        positive="true",
        settings=SETTINGS,
        formats=["png"],
    )
    assert len(table) == len(LAYERS) * 4 and table.cross_validated.sum() == 2 * len(LAYERS)
    assert imread(tmp_path / "gen.png").size > 0
    df = analysis.depth_comparison(
        {"tiny": root / "a" / "summary.csv", "tiny_twin": root / "b" / "summary.csv"},
        {"tiny": 2, "tiny_twin": 4},
        tmp_path / "depth.png",
        metric="auroc",
        dataset="x",
        component="resid_post",
        pooling="mean",
        formats=["png"],
    )
    assert set(df.model) == {"tiny", "tiny_twin"} and imread(tmp_path / "depth.png").size > 0


def test_task_vector_analysis_on_a_cached_grid(cached, tmp_path):
    root, files = cached
    names = ["separation", "norms", "cosine_chosen", "cosine_best", "pca"]
    out = {n: tmp_path / f"task_{n}.png" for n in names}
    out.update(scores=tmp_path / "scores.csv", matrices=tmp_path / "matrices.h5")
    info = analysis.task_vector_analysis(
        files["grid"],
        out,
        component="resid_post",
        pooling="last",
        n_boot=50,
        seed=0,
        layer=None,
        model="tiny",
        dataset="grid",
        formats=["png"],
    )
    scores = pd.read_csv(out["scores"])
    assert list(scores.layer) == LAYERS and np.isfinite(scores.separation).all()
    assert info["best_layer"] == int(scores.loc[scores.separation.idxmax(), "layer"])
    for n in names:
        assert imread(out[n]).size > 0
    with pytest.raises(Exception, match="not a cached layer"):
        analysis.task_vector_analysis(
            files["grid"],
            out,
            component="resid_post",
            pooling="last",
            n_boot=10,
            seed=0,
            layer=7,
            model="tiny",
            dataset="grid",
            formats=["png"],
        )


def test_summary_has_families_validity_columns_and_corrected_p(cached, tmp_path):
    """Issue 20: the logistic rows are what they always were (summary_rows of the stored result),
    each family adds its rows, the corrected p-values are Holm/BH of the logistic primary rows, and
    the probe card holds every family at the best layer."""
    from layerscope.analysis.probes import summary_rows
    from layerscope.analysis.validity import benjamini_hochberg, holm
    from layerscope.jobs.probe_causal_run import probe_card

    root, files = cached
    summary, jsons = _probe_summary(root, files, "a")
    assert set(summary.probe) == {"logistic", "mass_mean", "lda"}
    doc = json.loads(jsons[0].read_text())
    view = doc["probes"][0]
    keys = dict(model="tiny", dataset="a", layer=0, component=view["component"])
    old = summary_rows(view["result"], (0.55, 0.65), **keys, pooling=view["pooling"])
    logistic = [r for r in view["rows"] if r["probe"] == "logistic"]
    assert [{c: r[c] for c in old[0]} for r in logistic] == old
    assert set(old[0]) <= set(summary.columns)
    prim = summary[(summary.probe == "logistic") & summary.primary.astype(bool)]
    assert np.allclose(prim.p_holm, holm(prim.p_permutation), equal_nan=True)
    assert np.allclose(prim.p_bh, benjamini_hochberg(prim.p_permutation), equal_nan=True)
    fam = summary[summary.primary.astype(bool)]
    for col in ("selectivity", "selectivity_ci_low", "ece", "recall_fpr_1pct", "cos_logistic"):
        assert fam[col].notna().all(), col
    assert set(view["validity"]["families"]) == {"logistic", "mass_mean", "lda"}
    card = probe_card(
        root / "a" / "summary.csv",
        [],
        tmp_path / "card.csv",
        model="tiny",
        dataset="a",
        metric="auroc",
    )
    assert len(card) == 2 * 3 and card.causal.str.startswith("not tested").all()
