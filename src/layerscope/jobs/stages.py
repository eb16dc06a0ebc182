"""Stage glue for probes and figures: file paths in, tables and figures out.

Each function is what one workflow rule runs; the numerical work lives in ``probes``, ``stats``,
``plots`` and ``task_vectors``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from layerscope.analysis.probes import cross_dataset_matrix, transfer_metric
from layerscope.analysis.stats import activation_stats, prompt_norms
from layerscope.atomic import write_csv
from layerscope.data.consistency import check_files_against_table
from layerscope.data.h5cache import layer_attrs, read_layers
from layerscope.errors import LayerscopeError
from layerscope.plotting import plots

PathLike = str | os.PathLike


def best_layer(summary: pd.DataFrame, *, metric: str, component: str, pooling: str) -> int:
    """Layer with the highest mean ``metric`` for one (component, pooling); earliest on ties."""
    rows = summary[
        (summary.metric == metric) & (summary.component == component) & (summary.pooling == pooling)
    ]
    if rows.empty:
        raise LayerscopeError(f"no '{metric}' probe rows for {component}/{pooling} in the summary")
    rows = rows.sort_values(["mean", "layer"], ascending=[False, True], kind="stable")
    return int(rows.iloc[0]["layer"])


def probe_figure(
    summary_csv: PathLike,
    out: PathLike,
    *,
    metric: str,
    model: str,
    dataset: str,
    n_layers: int | None,
    formats: Sequence[str],
) -> list[str]:
    summary = pd.read_csv(summary_csv)
    return plots.metric_vs_layer(
        summary,
        out,
        metric=metric,
        model=model,
        dataset=dataset,
        n_layers=n_layers,
        formats=formats,
    )


def geometry_figures(
    layer_paths: Sequence[PathLike],
    summary_csv: PathLike,
    out: Mapping[str, PathLike],
    *,
    component: str,
    pooling: str,
    metric: str,
    model: str,
    dataset: str,
    formats: Sequence[str],
    table: PathLike | None = None,
) -> dict[str, int]:
    """PCA (and t-SNE when ``out`` has a 'tsne' entry; the workflow draws it in its own job, see
    :func:`tsne_figure`) of every layer; cosine and label-mean
    matrices at the best probe layer; norm heatmap and per-label norm curves over layers.

    ``table``: the dataset's current prompt table; the layer files must match it (see
    :mod:`layerscope.data.consistency`)."""
    if table is not None:
        check_files_against_table(layer_paths, table)
    stack = read_layers(layer_paths, component, pooling, stack=True)
    summary = pd.read_csv(summary_csv)
    best = best_layer(summary, metric=metric, component=component, pooling=pooling)
    X_best = stack.X[stack.layers.index(best)]
    common = dict(
        model=model, dataset=dataset, component=component, pooling=pooling, formats=formats
    )
    plots.pca_grid(stack.X, stack.layers, stack.labels, out["pca"], **common)
    if "tsne" in out:
        plots.tsne_grid(stack.X, stack.layers, stack.labels, out["tsne"], **common)
    plots.cosine_heatmap(
        X_best, stack.labels, out["cosine"], prompt_ids=stack.prompt_ids, layer=best, **common
    )
    plots.label_mean_matrix(X_best, stack.labels, out["label_means"], layer=best, **common)
    norms = prompt_norms(stack)
    plots.norm_heatmap(
        norms,
        stack.layers,
        stack.labels,
        out["norm_heatmap"],
        prompt_ids=stack.prompt_ids,
        **common,
    )
    plots.norm_curves(norms, stack.layers, stack.labels, out["norm_curves"], **common)
    return {"best_layer": best}


def tsne_figure(
    layer_paths: Sequence[PathLike],
    out: PathLike,
    *,
    component: str,
    pooling: str,
    model: str,
    dataset: str,
    formats: Sequence[str],
    table: PathLike | None = None,
) -> list[str]:
    """t-SNE of every layer (figures.tsne): slow, so a job of its own that only this setting
    runs."""
    if table is not None:
        check_files_against_table(layer_paths, table)
    stack = read_layers(layer_paths, component, pooling, stack=True)
    return plots.tsne_grid(
        stack.X,
        stack.layers,
        stack.labels,
        out,
        model=model,
        dataset=dataset,
        component=component,
        pooling=pooling,
        formats=formats,
    )


def activation_stats_table(
    layer_paths: Sequence[PathLike],
    out_csv: PathLike,
    *,
    positive: str | None = None,
    table: PathLike | None = None,
) -> pd.DataFrame:
    """Tidy per-layer, per-label statistics for every cached (component, pooling).

    ``table``: the dataset's current prompt table; the layer files must match it."""
    if table is not None:
        check_files_against_table(layer_paths, table)
    attrs = layer_attrs(layer_paths[0])
    tables = []
    for component in attrs["components"]:
        for pooling in attrs["poolings"]:
            stack = read_layers(layer_paths, component, pooling, stack=True)
            tables.append(
                activation_stats(
                    stack, component=component, pooling=pooling, positive_class=positive
                )
            )
    table = pd.concat(tables, ignore_index=True)
    write_csv(out_csv, table)
    return table


def generalization(
    layer_paths: Mapping[str, Sequence[PathLike]],
    out_csv: PathLike,
    out_fig: PathLike | None = None,
    *,
    component: str,
    pooling: str,
    metric: str,
    model: str,
    group: str,
    positive: str | None,
    settings: Mapping[str, Any],
    formats: Sequence[str] = ("png",),
    tables: Mapping[str, PathLike] | None = None,
    summaries: Mapping[str, PathLike] | None = None,
    n_boot: int = 1000,
) -> pd.DataFrame:
    """Train on one dataset, test on each other, at every layer they share: a table with a
    bootstrap interval (over test prompts) per cell. The diagonal is each dataset's probe summary
    at that layer (mean and interval), when ``summaries`` (dataset -> summary.csv) are given, so
    the figure and the probe curves agree; else the cross-validated mean of
    :func:`cross_dataset_matrix`. ``out_fig``: also draw the figure (the workflow draws it in its
    own job, plot_generalization).

    ``tables``: dataset name -> its current prompt table; each dataset's layer files must match
    it."""
    if tables is not None:
        missing = [name for name in layer_paths if name not in tables]
        if missing:
            raise LayerscopeError(f"generalization: no prompt table given for dataset(s) {missing}")
        for name, paths in layer_paths.items():
            check_files_against_table(paths, tables[name])
    stacks = {
        name: read_layers(paths, component, pooling, stack=True)
        for name, paths in layer_paths.items()
    }
    layers = sorted(set.intersection(*(set(s.layers) for s in stacks.values())))
    fit = {k: settings[k] for k in ("n_splits", "inner_splits", "seed") if k in settings}
    if "Cs" in settings:
        fit["Cs"] = tuple(settings["Cs"])
    diag = _summary_cells(summaries, component, pooling, metric) if summaries else {}
    rows = []
    for layer in layers:
        data = {
            name: (s.X[s.layers.index(layer)], s.labels, s.groups or s.prompt_ids)
            for name, s in stacks.items()
        }
        own = (
            cross_dataset_matrix(data, positive_class=positive, metric=metric, **fit)
            if not diag
            else None
        )
        for train in data:
            for test in data:
                if train == test:
                    cell = diag.get((train, layer)) or {
                        "value": float(own.loc[train, test]) if own is not None else np.nan,
                        "ci_low": np.nan,
                        "ci_high": np.nan,
                    }
                else:
                    cell = transfer_metric(
                        data[train],
                        data[test][:2],
                        positive_class=positive,
                        metric=metric,
                        inner_splits=fit.get("inner_splits", 3),
                        Cs=fit.get("Cs", (0.001, 0.01, 0.1, 1, 10, 100)),
                        seed=fit.get("seed", 0),
                        n_boot=n_boot,
                    )
                rows.append(
                    {
                        "model": model,
                        "group": group,
                        "layer": layer,
                        "component": component,
                        "pooling": pooling,
                        "metric": metric,
                        "train": train,
                        "test": test,
                        "cross_validated": train == test,
                        **cell,
                    }
                )
    table = pd.DataFrame(rows)
    write_csv(out_csv, table)
    if out_fig is not None:
        generalization_figure(out_csv, out_fig, model=model, formats=formats)
    return table


def _summary_cells(
    summaries: Mapping[str, PathLike], component: str, pooling: str, metric: str
) -> dict[tuple[str, int], dict[str, float]]:
    """(dataset, layer) -> the probe summary's mean and interval for one view and metric."""
    out = {}
    for name, path in summaries.items():
        s = pd.read_csv(path)
        s = s[(s.metric == metric) & (s.component == component) & (s.pooling == pooling)]
        for _, r in s.iterrows():
            out[(name, int(r["layer"]))] = {
                "value": float(r["mean"]),
                "ci_low": float(r["ci_low"]),
                "ci_high": float(r["ci_high"]),
            }
    return out


def generalization_figure(
    table_csv: PathLike, out_fig: PathLike, *, model: str, formats: Sequence[str]
) -> int:
    """The generalization matrix at the layer with the highest mean transfer (off-diagonal), which
    the title names; each cell shows its value and 95% interval. Returns that layer."""
    table = pd.read_csv(table_csv)
    transfer = table[~table.cross_validated].groupby("layer")["value"].mean()
    show = int(transfer.idxmax()) if not transfer.empty else int(table["layer"].max())
    at = table[table.layer == show]
    order = list(dict.fromkeys(at["train"]))
    pivot = {
        c: at.pivot(index="train", columns="test", values=c).reindex(index=order, columns=order)
        for c in ("value", "ci_low", "ci_high")
    }
    first = at.iloc[0]
    why = (
        f"layer {show}: the layer with the highest mean transfer {metric_name_of(first['metric'])} "
        f"({transfer.get(show, float('nan')):.2f}) of the {table['layer'].nunique()} layers tested"
    )
    plots.generalization_matrix(
        pivot["value"],
        out_fig,
        metric=first["metric"],
        layer=show,
        model=model,
        component=first["component"],
        pooling=first["pooling"],
        formats=formats,
        intervals=(pivot["ci_low"], pivot["ci_high"]),
        note=why,
    )
    return show


def metric_name_of(metric: str) -> str:
    return plots.metric_name(metric)


def depth_comparison(
    summaries: Mapping[str, PathLike],
    n_layers: Mapping[str, int],
    out: PathLike,
    *,
    metric: str,
    dataset: str,
    component: str,
    pooling: str,
    formats: Sequence[str],
) -> pd.DataFrame:
    """Every model's probe curve on a relative-depth axis, best layer marked."""
    frames = []
    for model, path in summaries.items():
        s = pd.read_csv(path)
        s = s[(s.metric == metric) & (s.component == component) & (s.pooling == pooling)].copy()
        s["model"] = model
        s["n_layers"] = n_layers[model]
        frames.append(s[["model", "n_layers", "layer", "mean", "ci_low", "ci_high", "chance"]])
    df = pd.concat(frames, ignore_index=True)
    plots.best_layer_vs_depth(
        df,
        out,
        metric=metric,
        dataset=dataset,
        chance=float(np.nanmean(df["chance"])),
        formats=formats,
    )
    return df


def task_vector_analysis(
    layer_paths: Sequence[PathLike],
    out: Mapping[str, PathLike],
    *,
    component: str,
    pooling: str,
    n_boot: int,
    seed: int,
    layer: int | None,
    model: str,
    dataset: str,
    formats: Sequence[str],
    table: PathLike | None = None,
) -> dict[str, int]:
    """:func:`task_vector_scores` then :func:`task_vector_figures` (the workflow runs them as two
    rules, so that a figure setting never reruns the computation)."""
    task_vector_scores(
        layer_paths,
        out["scores"],
        out.get("matrices"),
        component=component,
        pooling=pooling,
        n_boot=n_boot,
        seed=seed,
        model=model,
        dataset=dataset,
        table=table,
    )
    figures = {k: v for k, v in out.items() if k not in ("scores", "matrices")}
    return task_vector_figures(
        out["scores"],
        out["matrices"],
        figures,
        layer=layer,
        model=model,
        dataset=dataset,
        component=f"{component}/{pooling}",
        formats=formats,
    )


def task_vector_scores(
    layer_paths: Sequence[PathLike],
    scores_csv: PathLike,
    matrices_h5: PathLike,
    *,
    component: str,
    pooling: str,
    n_boot: int,
    seed: int,
    model: str,
    dataset: str,
    table: PathLike | None = None,
) -> pd.DataFrame:
    """Task geometry of a task-grid dataset at every cached layer: the scores table and the
    matrices (cosines, task vectors, centred prompts) that the figures are drawn from.

    ``table``: the dataset's current prompt table; the layer files must match it."""
    from layerscope.analysis import task_vectors as tv

    if table is not None:
        check_files_against_table(layer_paths, table)
    stack = read_layers(layer_paths, component, pooling, stack=True)
    if stack.groups is None:
        raise LayerscopeError(
            f"{layer_paths[0]}: no 'group' (number pair) stored; task vectors need it"
        )
    scores, arrays = tv.task_vectors_by_layer(stack, n_boot=n_boot, seed=seed)
    tv.write_task_vectors(
        (scores, arrays),
        matrices_h5,
        scores_csv,
        attrs={"model": model, "dataset": dataset, "component": component, "pooling": pooling},
    )
    return scores


def task_vector_figures(
    scores_csv: PathLike,
    matrices_h5: PathLike,
    out: Mapping[str, PathLike],
    *,
    layer: int | None,
    model: str,
    dataset: str,
    formats: Sequence[str],
    component: str | None = None,
) -> dict[str, int]:
    """The task-vector figures, from the files :func:`task_vector_scores` wrote: prompt cosine at
    the chosen and the best layer, separation and norms vs layer, PCA at the best layer."""
    from layerscope.analysis import task_vectors as tv
    from layerscope.plotting import task_vectors as ptv

    scores = pd.read_csv(scores_csv)
    arrays = tv.read_task_vectors(matrices_h5)
    if component is None:  # the view the scores were computed on, as recorded in the file
        component = f"{arrays['attrs'].get('component')}/{arrays['attrs'].get('pooling')}"
    layers = [int(x) for x in arrays["layers"]]
    best = tv.best_layer(scores)
    chosen = layer if layer is not None else layers[len(layers) // 2]
    if chosen not in layers:
        raise LayerscopeError(
            f"task_vectors.layer {chosen} is not a cached layer of {model} ({layers})"
        )
    common = dict(model=model, dataset=dataset, component=component, formats=formats)
    ptv.plot_separation(scores, out["separation"], **common)
    ptv.plot_norms(scores, out["norms"], **common)
    for key, at in (("cosine_chosen", chosen), ("cosine_best", best)):
        sl = tv.layer_arrays(arrays, at)
        ptv.plot_prompt_cosine(
            sl["prompt_cosine"],
            sl["prompt_tasks"],
            sl["prompt_pairs"],
            out[key],
            layer=at,
            **common,
        )
    sl = tv.layer_arrays(arrays, best)
    ptv.plot_task_pca(
        sl["centred"],
        sl["prompt_tasks"],
        out["pca"],
        layer=best,
        pairs=sl["prompt_pairs"],
        **common,
    )
    return {"best_layer": best, "chosen_layer": chosen}


def patching_experiment(
    pairs_path: PathLike,
    out: Mapping[str, PathLike],
    *,
    model: Mapping[str, Any],
    settings: Mapping[str, Any],
    experiment: str,
    model_name: str,
    device: str,
    batch_size: int,
    threads: int | None,
    precision: Mapping[str, Any] | None = None,
    engine: str = "auto",
    log=print,
) -> dict[str, Any]:
    """Load the model, run the logit-difference sweep and, when
    ``settings["generation"]["enabled"]``, generation patching; write tables only (``cells``,
    ``arrays``, ``summary``, ``generation``, ``generation_summary``). Figures are drawn by the
    plot job from these tables."""
    import torch

    from layerscope.interventions import patching

    if threads and device in ("cpu", "auto"):
        torch.set_num_threads(int(threads))
    pairs = patching.load_pairs(pairs_path)
    gen = settings.get("generation") or {}
    # Per-head patching needs the bridge's hook_z; everything else runs on `engine` (native by
    # default).
    sweep_engine = "bridge" if settings["heads"] else engine
    bridge, info = _load_for_patching(model, sweep_engine, settings["components"], device, log)
    result = patching.patch_sweep(
        bridge,
        pairs,
        components=settings["components"],
        layers=settings.get("layers"),
        positions=settings["positions"],
        heads=settings["heads"],
        batch_size=batch_size,
        prepend_bos=model["bos"],
        log=log,
        model_info=info,
    )
    patching.write_patching(result, out["cells"], out["arrays"])
    summary = patching.summarize(result, n_boot=settings["n_boot"], seed=settings["seed"])
    write_csv(out["summary"], summary)
    if gen.get("enabled"):
        gen_components = gen["components"] or settings["components"]
        if info.get("engine") != "native" and engine != "bridge":
            bridge, _ = _load_for_patching(model, engine, gen_components, device, log)
        _generation_patching(
            bridge,
            pairs,
            result,
            summary,
            out,
            gen,
            settings,
            model,
            batch_size,
            precision or {},
            log,
        )
    return {"n_pairs": len(pairs), "notes": list(result.notes)}


def _load_for_patching(model: Mapping[str, Any], engine: str, components, device: str, log):
    from layerscope.engine.activations import load_engine

    loaded, info = load_engine(
        model["source"],
        engine=engine,
        components=list(components),
        dtype=model["dtype"],
        device=device,
        compatibility_mode=model["compatibility_mode"],
        revision=model.get("revision"),
        log=log,
    )
    log(f"patching model: engine {info.get('engine', 'bridge')}")
    return loaded, info


def _generation_patching(
    bridge,
    pairs,
    result,
    ld_summary,
    out,
    gen: Mapping[str, Any],
    settings: Mapping[str, Any],
    model: Mapping[str, Any],
    batch_size: int,
    precision: Mapping[str, Any],
    log,
) -> None:
    """Generation patching of the same pairs; rows and the summary beside the logit recovery."""
    import time

    from layerscope.interventions import generation as G

    t0 = time.perf_counter()
    layers = gen["layers"] if gen["layers"] != "all" else range(int(bridge.cfg.n_layers))
    rows = G.generation_sweep(
        G.stepper_for(bridge),
        bridge.tokenizer,
        pairs,
        components=gen["components"] or settings["components"],
        layers=layers,
        positions=gen["positions"],
        ranges=gen["ranges"],
        max_new_tokens=gen["max_new_tokens"],
        answer_regex=gen["answer_regex"],
        prepend_bos=model["bos"],
        batch_size=batch_size,
        log=log,
    )
    summary = G.summarize_generation(rows, precision)
    summary = G.add_logit_recovery(summary, ld_summary, G.length_map(rows, result.pairs))
    write_csv(out["generation"], rows)
    write_csv(out["generation_summary"], summary)
    log(
        f"generation patching: {rows.attrs['n_patched_generations']} patched generations "
        f"({rows.attrs['n_skipped_identical']} skipped as identical) in "
        f"{time.perf_counter() - t0:.1f} s"
    )
