"""The attribution job of one patching experiment (method ``attribution`` or ``screen``): estimate
every cell on the native engine, verify the screen's cells by exact patching, write the tables."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import pandas as pd

from layerscope.atomic import atomic_path, write_json
from layerscope.settings import ModelSettings, PatchingSettings

PathLike = str | os.PathLike


def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _verify(model, settings, pairs, table, batch_size, device, engine, log):
    """Exact patching of the cells the screen selected, in the exact sweep's machinery, on the
    engine the exact sweep would use (:func:`stages.load_for_sweep`). Returns (table with
    ``exact``, seconds)."""
    from layerscope.interventions import patching as P
    from layerscope.interventions import screen as S
    from layerscope.jobs.stages import load_for_sweep

    a = settings.attribution
    table = S.select_cells(table, a.top_k, a.n_random, settings.seed)
    bridge, info = load_for_sweep(model, settings, engine, device, log)
    t0 = time.perf_counter()
    ex = P.patch_sweep(
        bridge,
        pairs,
        components=list(settings.components),
        positions=_json_value(settings.positions),
        heads=settings.heads,
        head_positions="positions",
        batch_size=batch_size,
        prepend_bos=model.bos,
        log=log,
        model_info=info,
        only=S.verify_keys(table),
    )
    return S.with_exact(table, ex.df), time.perf_counter() - t0, ex.notes


def _graddrop_column(res, table):
    """``atp_graddrop``: the mean over pairs of the GradDrop magnitude (recovery units)."""
    from layerscope.interventions import screen as S

    gd = res.means(n_boot=0, arrays=res.graddrop).set_index(S.KEY)["atp"]
    out = table.copy()
    out["atp_graddrop"] = gd.reindex(pd.MultiIndex.from_frame(out[S.KEY])).to_numpy()
    return out


def _graddrop_change(table) -> dict[str, Any]:
    """What GradDrop changes on the verified cells: Spearman of |exact| with |atp| and with the
    GradDrop magnitude, and how many of the top-k by each are among the top-k by |exact|."""
    from scipy.stats import spearmanr

    ver = table[table["verified"]]
    out: dict[str, Any] = {"n_cells": int(len(ver))}
    if len(ver) < 3:
        return out
    ex = ver["exact"].abs()
    for name, col in (("abs_atp", ver["atp"].abs()), ("graddrop", ver["atp_graddrop"])):
        out[f"spearman_abs_exact_vs_{name}"] = float(spearmanr(ex, col).statistic)
    return out


def attribution_experiment(
    pairs_path: PathLike,
    out: Mapping[str, PathLike],
    *,
    model: ModelSettings | Mapping[str, Any],
    settings: PatchingSettings | Mapping[str, Any],
    method: str,
    device: str,
    batch_size: int,
    threads: int | None,
    engine: str = "auto",
    log=print,
) -> dict[str, Any]:
    """Attribution (and, for ``method == "screen"``, the exact verification) of one experiment;
    writes ``out["table"]`` (attribution.csv), ``out["arrays"]`` (per-pair HDF5) and
    ``out["summary"]`` (attribution_summary.json)."""
    import torch

    from layerscope.engine.loading import load_from_settings
    from layerscope.interventions import attribution as A
    from layerscope.interventions import patching as P
    from layerscope.interventions import screen as S

    model, settings = ModelSettings.of(model), PatchingSettings.of(settings)
    a = settings.attribution
    if threads and device in ("cpu", "auto"):
        torch.set_num_threads(int(threads))
    pairs = P.load_pairs(pairs_path)
    engine_name = "native" if engine in ("auto", "native") else engine
    native, _ = load_from_settings(
        model, settings.components, engine=engine_name, device=device, log=log
    )
    res = A.attribute(
        native,
        pairs,
        components=list(settings.components),
        positions=_json_value(settings.positions),
        heads=settings.heads,
        qk_fix=a.qk_fix and settings.heads,
        grad_drop=a.grad_drop,
        max_tokens_per_batch=a.max_tokens_per_batch,
        prepend_bos=model.bos,
        log=log,
    )
    means = res.means(settings.n_boot, settings.seed)
    table = S.attribution_table_from_means(means.drop(columns="n_pairs"))
    if a.grad_drop:
        table = _graddrop_column(res, table)
    notes = list(res.notes)
    info = dict(res.info, method_requested=method, top_k=a.top_k, n_random=a.n_random)
    info.update(seed=settings.seed, n_boot=settings.n_boot)
    if method == "screen":
        table, info["verification_seconds"], more = _verify(
            model, settings, pairs, table, batch_size, device, engine, log
        )
        notes += more
    corr = S.correlations(table, settings.n_boot, settings.seed)
    miss = S.miss_rate(table)
    summary = S.summary(table, info, corr, miss) | {"notes": notes}
    if a.grad_drop:
        summary["graddrop"] = _graddrop_change(table)
    if summary["degenerate"]:
        log(f"WARNING {summary['degenerate']}")
    with atomic_path(out["table"]) as tmp:
        table[_columns(table)].to_csv(tmp, index=False)
    A.write_arrays(res, table, out["arrays"])
    write_json(out["summary"], summary)
    log(f"attribution: {miss['statement']}")
    return {"n_pairs": len(pairs), "notes": notes, "summary": summary}


def _columns(table) -> list[str]:
    from layerscope.interventions.screen import ATTRIBUTION_COLUMNS

    return list(ATTRIBUTION_COLUMNS) + (["atp_graddrop"] if "atp_graddrop" in table else [])
