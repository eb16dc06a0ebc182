"""Probe jobs: one layer file -> every (component, pooling) probe; probe files -> summary table."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pandas as pd

from layerscope.analysis.probes import fit_probe, jsonable, summary_rows
from layerscope.analysis.validity import (
    benjamini_hochberg,
    holm,
    probe_validity,
    validity_columns,
)
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
    # The summary corrects p across every (layer, component, pooling) of the dataset; deciding
    # each sequential test at alpha / (the most such tests: every layer of the model) lets a
    # clearly significant probe pass that correction. From the file, not the configured layers,
    # so adding a layer reruns only that layer.
    n_tests = int(attrs["n_layers"]) * len(attrs["components"]) * len(attrs["poolings"])
    fit_kwargs["permutation_level"] = settings.alpha / n_tests
    checks = _validity_kwargs(settings)
    probes = []
    for ci, component in enumerate(attrs["components"]):
        for pi, pooling in enumerate(attrs["poolings"]):
            keys = dict(
                model=model, dataset=dataset, layer=layer, component=component, pooling=pooling
            )
            probes.append(
                _view_probe(
                    layer_path, keys, (layer, ci, pi), positive, fit_kwargs, thresholds, log, checks
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


def _validity_kwargs(settings: ProbeSettings) -> dict[str, Any]:
    """The :func:`probe_validity` keyword arguments of the probe ``settings``."""
    return dict(
        families=settings.families,
        shrinkages=settings.shrinkages,
        control_task=settings.control_task,
        n_boot=settings.n_boot,
        n_bins=settings.calibration_bins,
        fprs=settings.fprs,
    )


def _view_probe(
    layer_path, keys, stream, positive, fit_kwargs, thresholds, log, checks
) -> dict[str, Any]:
    """Fit, log and describe the probe of one (component, pooling) view of a layer file: the
    logistic probe, then the other families and the validity checks on the same folds."""
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
    t0 = time.perf_counter()
    validity = probe_validity(data.X, data.labels, groups, result, **checks)
    rows = summary_rows(result, thresholds, **keys)
    primary = next(r for r in rows if r["primary"])
    log(
        f"layer {layer} {component}/{pooling}: {primary['metric']} {primary['mean']:.3f} "
        f"[{primary['ci_low']:.3f}, {primary['ci_high']:.3f}] p={primary['p_permutation']} "
        f"(Monte-Carlo s.e. {primary['p_permutation_se']}); validity checks "
        f"{time.perf_counter() - t0:.2f} s"
    )
    rows = _with_validity(rows, result.to_dict(), validity, thresholds, keys)
    # Which class a positive score (and every family's direction) points towards: binary only.
    pos = result.classes[1] if len(result.classes) == 2 else None
    for row in rows:
        row["positive_class"] = None if pos is None else str(pos)
    return {
        "component": component,
        "pooling": pooling,
        "rows": rows,
        "result": result.to_dict(),
        "validity": jsonable(validity),
    }


def _with_validity(rows, result, validity, thresholds, keys) -> list[dict[str, Any]]:
    """The logistic rows with the validity columns added, then each other family's rows."""
    out = []
    for fam, entry in validity["families"].items():
        if fam == "logistic":
            fam_rows = [dict(r) for r in rows]
        else:
            as_result = dict(
                result,
                metrics=entry["metrics"],
                permutation={"p_value": None, "mc_se": None},
                random_directions={"p95": None},
                C=None,
            )
            fam_rows = summary_rows(as_result, thresholds, **keys)
        cos = 1.0 if fam == "logistic" else validity["cosines"].get(f"logistic~{fam}")
        extra = validity_columns(entry, cos)
        for r in fam_rows:
            r["probe"] = fam
            r["shrinkage"] = entry["shrinkage"]
            r.update({c: (v if r["primary"] else None) for c, v in extra.items()})
        out.extend(fam_rows)
    return out


def summarize_probes(
    json_paths: Iterable[str | os.PathLike], out_csv: str | os.PathLike, *, alpha: float = 0.05
) -> pd.DataFrame:
    """Concatenate the tidy rows of every probe file into one summary table, sorted by keys.

    Adds the multiple-testing columns (``p_holm``, ``p_bh``: the logistic probes' permutation
    p-values corrected across every layer, component and pooling of the dataset) and
    ``passes_checks`` (see :func:`passes_checks`)."""
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
    table = corrected_pvalues(table)
    table["passes_checks"] = passes_checks(table, alpha)
    write_csv(out_csv, table)
    return table


def holm_floor_warning(table: pd.DataFrame, n_permutations: int, alpha: float) -> str | None:
    """The named warning ``holm_floor`` when no permutation test of the dataset can pass the
    Holm correction: the smallest p-value n permutations can give is 1 / (n + 1), and Holm
    multiplies the smallest of m p-values by m."""
    m = int(((table["probe"] == "logistic") & table["primary"].astype(bool)).sum())
    if n_permutations <= 0 or m == 0 or m / (n_permutations + 1) < alpha:
        return None
    need = math.ceil(m / alpha)
    return (
        f"holm_floor: {m} permutation tests are corrected together, and with at most "
        f"{n_permutations} permutations the smallest Holm-corrected p is {m}/{n_permutations + 1}"
        f" = {m / (n_permutations + 1):.3g} >= alpha {alpha}: no logistic probe can pass; set "
        f"probes.n_permutations to at least {need} (or probe fewer layers, components, poolings)"
    )


def probe_rows(summary: pd.DataFrame, probe: str = "logistic") -> pd.DataFrame:
    """The rows of one probe family (a summary without a ``probe`` column is all logistic)."""
    if "probe" not in summary.columns:
        return summary if probe == "logistic" else summary.iloc[:0]
    return summary[summary["probe"] == probe]


def corrected_pvalues(table: pd.DataFrame) -> pd.DataFrame:
    """``p_holm`` and ``p_bh`` on the logistic primary rows (the tests of one dataset), else NaN."""
    table = table.copy()
    if "probe" not in table.columns:
        table["probe"] = "logistic"
    tested = (table["probe"] == "logistic") & table["primary"].astype(bool)
    p = pd.to_numeric(table.loc[tested, "p_permutation"], errors="coerce").to_numpy()
    table["p_holm"] = float("nan")
    table["p_bh"] = float("nan")
    table.loc[tested, "p_holm"] = holm(p)
    table.loc[tested, "p_bh"] = benjamini_hochberg(p)
    return table


def passes_checks(table: pd.DataFrame, alpha: float) -> pd.Series:
    """Per primary row: does the probe pass every per-layer check?

    The interval reads "direction exists", the selectivity interval lies above 0, and, for the
    logistic probe (the only one with a permutation test and random directions), the
    Holm-corrected p-value is below ``alpha`` and the mean beats the random directions' 95th
    percentile. Non-primary rows: False. (The causal test runs at the best layer only; the probe
    card reports it.)"""

    def num(col):
        if col not in table.columns:
            return pd.Series(float("nan"), index=table.index)
        return pd.to_numeric(table[col], errors="coerce")

    ok = table["primary"].astype(bool) & (table["interpretation"] == "direction exists")
    ok &= num("selectivity_ci_low") > 0
    logistic = table["probe"] == "logistic"
    ok &= ~logistic | ((num("p_holm") < alpha) & (num("mean") > num("random_direction_p95")))
    return ok
