"""Probe jobs: one layer file -> every (component, pooling) probe; probe files -> summary table."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pandas as pd

from layerscope.analysis.probes import fit_probe, summary_rows
from layerscope.atomic import write_csv, write_json
from layerscope.data.consistency import check_files_against_table
from layerscope.data.h5cache import layer_attrs, read_layer
from layerscope.errors import LayerscopeError
from layerscope.settings import ProbeSettings

SUMMARY_KEYS = ["model", "dataset", "layer", "component", "pooling"]


def positive_class(summary_json: str | os.PathLike) -> str | None:
    """The dataset's positive class (e.g. 'faithful', 'true') from its prompt-table summary."""
    with open(summary_json, encoding="utf-8") as f:
        return json.load(f).get("positive_class")


def train_layer_probes(
    layer_path: str | os.PathLike,
    out_json: str | os.PathLike,
    *,
    model: str,
    dataset: str,
    settings: ProbeSettings | Mapping[str, Any],
    positive: str | None = None,
    log: Callable[[str], Any] = print,
    table: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Fit one probe per cached (component, pooling) of a layer file and write them to one JSON.

    ``table``: the dataset's current prompt table; the layer file must hold exactly its prompts
    and labels, in order (see :mod:`layerscope.data.consistency`). ``settings``: the probe settings,
    or a mapping completed from the schema's defaults."""
    settings = ProbeSettings.of(settings)
    if table is not None:
        check_files_against_table([layer_path], table)
    attrs = layer_attrs(layer_path)
    layer = int(attrs["layer"])
    thresholds = settings.thresholds
    fit_kwargs = _fit_kwargs(settings)
    probes = []
    for ci, component in enumerate(attrs["components"]):
        for pi, pooling in enumerate(attrs["poolings"]):
            keys = dict(
                model=model, dataset=dataset, layer=layer, component=component, pooling=pooling
            )
            probes.append(
                _view_probe(
                    layer_path, keys, (layer, ci, pi), positive, fit_kwargs, thresholds, log
                )
            )
    doc = {
        "model": model,
        "dataset": dataset,
        "layer": layer,
        "layer_file": os.fspath(layer_path),
        "activation_attrs": {
            k: attrs.get(k)
            for k in (
                "model",
                "model_revision",
                "dtype",
                "n_layers",
                "d_model",
                "compatibility_mode",
            )
        },
        "settings": settings.to_dict(),
        "probes": probes,
    }
    write_json(out_json, doc)
    return doc


def _fit_kwargs(settings: ProbeSettings) -> dict[str, Any]:
    """The :func:`fit_probe` keyword arguments of the probe ``settings``."""
    names = ("n_splits", "n_repeats", "inner_splits", "Cs")
    names += ("n_permutations", "n_random_directions", "seed")
    return {name: getattr(settings, name) for name in names}


def _view_probe(layer_path, keys, stream, positive, fit_kwargs, thresholds, log) -> dict[str, Any]:
    """Fit, log and describe the probe of one (component, pooling) view of a layer file."""
    layer, component, pooling = keys["layer"], keys["component"], keys["pooling"]
    data = read_layer(layer_path, component, pooling)
    groups = data.groups if data.groups is not None else data.prompt_ids
    # Independent permutations per layer and view, not one stream reused at every layer.
    result = fit_probe(
        data.X,
        data.labels,
        groups,
        positive_class=positive,
        stream=stream,
        **fit_kwargs,
    )
    rows = summary_rows(result, thresholds, **keys)
    primary = next(r for r in rows if r["primary"])
    log(
        f"layer {layer} {component}/{pooling}: {primary['metric']} {primary['mean']:.3f} "
        f"[{primary['ci_low']:.3f}, {primary['ci_high']:.3f}] p={primary['p_permutation']} "
        f"(Monte-Carlo s.e. {primary['p_permutation_se']})"
    )
    return {
        "component": component,
        "pooling": pooling,
        "rows": rows,
        "result": result.to_dict(),
    }


def summarize_probes(
    json_paths: Iterable[str | os.PathLike], out_csv: str | os.PathLike
) -> pd.DataFrame:
    """Concatenate the tidy rows of every probe file into one summary table, sorted by keys."""
    rows = []
    for path in json_paths:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if "probes" not in doc:
            raise LayerscopeError(f"{path}: not a probe file (no 'probes' key)")
        for probe in doc["probes"]:
            rows.extend(probe["rows"])
    table = pd.DataFrame(rows)
    if table.empty:
        raise LayerscopeError("no probe results to summarize")
    table = table.sort_values(SUMMARY_KEYS + ["metric"], kind="stable").reset_index(drop=True)
    write_csv(out_csv, table)
    return table
