"""Stage glue for probes and figures: file paths in, tables and figures out.

Each function is what one workflow rule runs; the numerical work lives in ``probes``, ``stats``,
``plots`` and ``task_vectors``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from layerscope.analysis.probes import cross_dataset_matrix, transfer_metric
from layerscope.analysis.stats import activation_stats, prompt_norms
from layerscope.atomic import write_csv, write_json
from layerscope.data.consistency import check_files_against_table
from layerscope.data.h5cache import layer_attrs, read_layers
from layerscope.errors import LayerscopeError
from layerscope.jobs.probe_runs import probe_rows
from layerscope.plotting import plots
from layerscope.settings import ModelSettings, PatchingSettings, PrecisionSettings, ProbeSettings

PathLike = str | os.PathLike


def best_layer(summary: pd.DataFrame, *, metric: str, component: str, pooling: str) -> int:
    """Layer with the highest mean ``metric`` for one (component, pooling); earliest on ties."""
    summary = probe_rows(summary)  # the best layer is the logistic probe's
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
    summary = probe_rows(pd.read_csv(summary_csv))
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
    """t-SNE of every layer (figures.tsne): slow, so a job of its own, run only for this setting."""
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
    settings: ProbeSettings | Mapping[str, Any],
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
    stacks = _generalization_stacks(layer_paths, tables, component, pooling)
    layers = sorted(set.intersection(*(set(s.layers) for s in stacks.values())))
    settings = ProbeSettings.of(settings)
    fit = {
        "n_splits": settings.n_splits,
        "inner_splits": settings.inner_splits,
        "seed": settings.seed,
        "Cs": settings.Cs,
    }
    diag = _summary_cells(summaries, component, pooling, metric) if summaries else {}
    key = {"model": model, "group": group}
    view = {"component": component, "pooling": pooling, "metric": metric}
    rows = []
    for layer in layers:
        data = {
            name: (s.X[s.layers.index(layer)], s.labels, s.groups or s.prompt_ids)
            for name, s in stacks.items()
        }
        cells = _generalization_cells(data, layer, diag, positive, metric, fit, n_boot)
        for (train, test), cell in cells.items():
            rows.append(
                {
                    **key,
                    "layer": layer,
                    **view,
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


def _generalization_stacks(layer_paths, tables, component, pooling) -> dict[str, Any]:
    """Each dataset's layer stack, its files first checked against its prompt table if given."""
    if tables is not None:
        missing = [name for name in layer_paths if name not in tables]
        if missing:
            raise LayerscopeError(f"generalization: no prompt table given for dataset(s) {missing}")
        for name, paths in layer_paths.items():
            check_files_against_table(paths, tables[name])
    return {
        name: read_layers(paths, component, pooling, stack=True)
        for name, paths in layer_paths.items()
    }


def _generalization_cells(data, layer, diag, positive, metric, fit, n_boot) -> dict[tuple, dict]:
    """(train, test) -> value and interval of one layer's cells, train-major order."""
    own = (
        cross_dataset_matrix(data, positive_class=positive, metric=metric, **fit)
        if not diag
        else None
    )
    cells = {}
    for train in data:
        for test in data:
            if train == test:
                cells[train, test] = diag.get((train, layer)) or {
                    "value": float(own.loc[train, test]) if own is not None else np.nan,
                    "ci_low": np.nan,
                    "ci_high": np.nan,
                }
            else:
                cells[train, test] = transfer_metric(
                    data[train],
                    data[test][:2],
                    positive_class=positive,
                    metric=metric,
                    inner_splits=fit["inner_splits"],
                    Cs=fit["Cs"],
                    seed=fit["seed"],
                    n_boot=n_boot,
                )
    return cells


def _summary_cells(
    summaries: Mapping[str, PathLike], component: str, pooling: str, metric: str
) -> dict[tuple[str, int], dict[str, float]]:
    """(dataset, layer) -> the probe summary's mean and interval for one view and metric."""
    out = {}
    for name, path in summaries.items():
        s = probe_rows(pd.read_csv(path))
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
        s = probe_rows(pd.read_csv(path))
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
    model: ModelSettings | Mapping[str, Any],
    settings: PatchingSettings | Mapping[str, Any],
    experiment: str,
    model_name: str,
    device: str,
    batch_size: int,
    threads: int | None,
    precision: PrecisionSettings | Mapping[str, Any] | None = None,
    engine: str = "auto",
    log=print,
) -> dict[str, Any]:
    """Load the model, run the logit-difference sweep and, when ``settings.generation.enabled``,
    generation patching; write tables only (``cells``, ``arrays``, ``summary``, ``generation``,
    ``generation_summary``). Figures are drawn by the plot job from these tables.

    ``model``, ``settings``, ``precision``: typed settings, or mappings completed from the
    schema."""
    import torch

    from layerscope.interventions import patching

    model, settings = ModelSettings.of(model), PatchingSettings.of(settings)
    if threads and device in ("cpu", "auto"):
        torch.set_num_threads(int(threads))
    pairs = patching.load_pairs(pairs_path)
    bridge, info = load_for_sweep(model, settings, engine, device, log)
    warnings = _clean_run_warnings(bridge, pairs, settings, model, batch_size, log)
    result = patching.patch_sweep(
        bridge,
        pairs,
        components=list(settings.components),
        layers=None,  # every layer: the sweep is cheap next to what it answers
        positions=_json_value(settings.positions),
        heads=settings.heads,
        batch_size=batch_size,
        prepend_bos=model.bos,
        log=log,
        model_info=info,
    )
    patching.write_patching(result, out["cells"], out["arrays"])
    summary = patching.summarize(result, n_boot=settings.n_boot, seed=settings.seed)
    write_csv(out["summary"], summary)
    if settings.generation.enabled:
        gen_components = settings.generation.components or settings.components
        if info.get("engine") != "native" and engine != "bridge":
            bridge, _ = _load_for_patching(model, engine, gen_components, device, log)
        run = PatchingRun(bridge, pairs, result, summary, out, model, batch_size, log)
        _generation_patching(run, settings, PrecisionSettings.of(precision))
    done = {"n_pairs": len(pairs), "notes": list(result.notes), "warnings": warnings}
    if "run" in out:
        write_json(out["run"], done)
    return done


def _clean_run_warnings(bridge, pairs, settings: PatchingSettings, model, batch_size, log) -> list:
    """Generation patching's pre-flight on the clean prompts (refuses a setup whose recovery rates
    could only be 0), run before the logit sweep: a bad answer rule costs seconds, not the sweep."""
    if not settings.generation.enabled:
        return []
    from layerscope.interventions import generation as G

    gen = settings.generation
    warnings = G.clean_run_check(
        G.stepper_for(bridge),
        bridge.tokenizer,
        pairs,
        max_new_tokens=gen.max_new_tokens,
        answer_regex=gen.answer_regex,
        prepend_bos=model.bos,
        batch_size=batch_size,
    )
    for w in warnings:
        log(f"WARNING {w}")
    return warnings


def _json_value(value: Any) -> Any:
    """A settings value as it reads in the config (tuples as lists), for functions that take
    those."""
    return list(value) if isinstance(value, tuple) else value


def load_for_sweep(model: ModelSettings, settings: PatchingSettings, engine: str, device, log):
    """The model the exact sweep runs on: ``engine`` (native by default), which reads per-head z
    at the attention output projection's input; the bridge only where per-head patching is asked
    for and the native engine has no such projection (``engine: native`` then refuses)."""
    from layerscope.interventions.patching import heads_available

    loaded, info = _load_for_patching(model, engine, settings.components, device, log)
    if settings.heads and not heads_available(loaded) and info.get("engine") == "native":
        if engine == "native":
            raise LayerscopeError(
                f"engine: native cannot patch heads of {model.source}: its attention has no "
                "output projection to read per-head values at; use engine: auto or bridge"
            )
        log("per-head patching: the native engine has no output projection here; using the bridge")
        loaded, info = _load_for_patching(model, "bridge", settings.components, device, log)
    return loaded, info


def _load_for_patching(model: ModelSettings, engine: str, components, device: str, log):
    """The model on ``engine`` with hooks for ``components``; logs which engine it got."""
    from layerscope.engine.loading import load_from_settings

    loaded, info = load_from_settings(model, components, engine=engine, device=device, log=log)
    log(f"patching model: engine {info.get('engine', 'bridge')}")
    return loaded, info


@dataclasses.dataclass(frozen=True)
class PatchingRun:
    """What generation patching takes over from the logit-difference sweep of one experiment."""

    bridge: Any
    pairs: Any
    result: Any
    ld_summary: Any
    out: Mapping[str, PathLike]
    model: ModelSettings
    batch_size: int
    log: Any


def _generation_patching(
    run: PatchingRun, settings: PatchingSettings, precision: PrecisionSettings
) -> None:
    """Generation patching of the same pairs; rows and the summary beside the logit recovery."""
    import time

    from layerscope.interventions import generation as G

    gen, bridge, log = settings.generation, run.bridge, run.log
    t0 = time.perf_counter()
    layers = gen.layers if gen.layers != "all" else range(int(bridge.cfg.n_layers))
    rows = G.generation_sweep(
        G.stepper_for(bridge),
        bridge.tokenizer,
        run.pairs,
        components=list(gen.components or settings.components),
        layers=_json_value(layers),
        positions=_json_value(gen.positions),
        ranges=list(gen.ranges),
        max_new_tokens=gen.max_new_tokens,
        answer_regex=gen.answer_regex,
        prepend_bos=run.model.bos,
        batch_size=run.batch_size,
        log=log,
    )
    summary = G.summarize_generation(rows, precision.to_dict())
    summary = G.add_logit_recovery(summary, run.ld_summary, G.length_map(rows, run.result.pairs))
    write_csv(run.out["generation"], rows)
    write_csv(run.out["generation_summary"], summary)
    log(
        f"generation patching: {rows.attrs['n_patched_generations']} patched generations "
        f"({rows.attrs['n_skipped_identical']} skipped as identical) "
        f"in {time.perf_counter() - t0:.1f} s"
    )


def reliability_figure(
    probe_jsons: Sequence[PathLike],
    summary_csv: PathLike,
    out: PathLike,
    *,
    metric: str,
    component: str,
    pooling: str,
    model: str,
    dataset: str,
    formats: Sequence[str],
) -> int:
    """The reliability diagram of every probe family at the best layer of one view (repeat 0's
    held-out probabilities, equal-mass bins, from the layer's probe JSON). Returns that layer."""
    import json

    best = best_layer(pd.read_csv(summary_csv), metric=metric, component=component, pooling=pooling)
    for path in probe_jsons:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if int(doc["layer"]) != best:
            continue
        probe = next(
            p for p in doc["probes"] if p["component"] == component and p["pooling"] == pooling
        )
        curves = {
            fam: {"bins": e["calibration"]["reliability"], "ece": e["calibration"]["ece"]["value"]}
            for fam, e in probe["validity"]["families"].items()
        }
        title = f"{model} / {dataset}: calibration at layer {best} ({component}/{pooling})"
        plots.reliability_diagram(curves, out, title=title, formats=formats)
        return best
    raise LayerscopeError(f"no probe file for the best layer {best} among the inputs")
