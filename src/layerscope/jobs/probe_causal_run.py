"""Causal-test job (one per model and steering experiment whose direction is a probe), and the
probe card (one per model and dataset): files in, tables out."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from layerscope.atomic import write_csv
from layerscope.errors import LayerscopeError
from layerscope.interventions import probe_causal as PC
from layerscope.interventions import steering as S
from layerscope.jobs.probe_runs import probe_rows
from layerscope.jobs.steering_run import dataset_prompts, load_neutral, load_prompts
from layerscope.settings import ModelSettings, ProbeCausalSettings

PathLike = str | os.PathLike


def family_directions(doc: Mapping[str, Any], component: str, pooling: str, what: str) -> dict:
    """Family -> unit direction (positive class) of a binary probe view in a layer's probe JSON."""
    for probe in doc.get("probes", []):
        if probe.get("component") == component and probe.get("pooling") == pooling:
            fams = (probe.get("validity") or {}).get("families") or {}
            if not fams:
                raise LayerscopeError(f"{what}: no probe families for {component}/{pooling}")
            out = {}
            for name, entry in fams.items():
                coef = entry["coef"]
                if len(coef) != 1:
                    raise LayerscopeError(
                        f"{what}: the {component}/{pooling} probe has {len(coef)} classes; "
                        "the causal test needs a binary probe"
                    )
                out[name] = S.unit(coef[0], f"{what}: {name} direction")
            return out
    raise LayerscopeError(f"{what}: no probe for {component}/{pooling}")


def tested_layers(summary_csv: PathLike, spec: Mapping[str, Any], metric: str, extra) -> list:
    """The best logistic-probe layer of the direction's view, then the configured extra layers."""
    from layerscope.jobs.stages import best_layer

    summary = probe_rows(pd.read_csv(summary_csv))
    best = best_layer(summary, metric=metric, component=spec["component"], pooling=spec["pooling"])
    return [best] + sorted(set(int(L) for L in extra) - {best})


def causal_job(
    files: Mapping[str, Any],
    out_csv: PathLike,
    *,
    model: ModelSettings | Mapping[str, Any],
    experiment: Mapping[str, Any],
    causal: ProbeCausalSettings | Mapping[str, Any],
    metric: str,
    device: str,
    batch_size: int,
    engine: str = "auto",
    log=print,
) -> pd.DataFrame:
    """Ablation and +-alpha addition of every family's direction at the best layer (and
    ``causal.layers``) on the experiment's prompts; writes one table (``CAUSAL_COLUMNS`` plus
    ``best_layer`` and ``verdict``)."""
    from layerscope.engine.loading import hook_name, load_from_settings
    from layerscope.engine.tokens import resolve_bos

    model, causal = ModelSettings.of(model), ProbeCausalSettings.of(causal)
    t0 = time.perf_counter()
    spec = experiment["direction"]
    layers = tested_layers(files["summary"], spec, metric, causal.layers)
    probes = {int(json.load(open(p, encoding="utf-8"))["layer"]): p for p in files["probes"]}
    targets = experiment.get("targets")
    prompts = (
        dataset_prompts(files["prompts"], targets)
        if "dataset" in experiment
        else load_prompts(files["prompts"], targets)
    )
    hooks = [hook_name(experiment["hook"], L) for L in layers]
    bridge, _ = load_from_settings(
        model, [experiment["hook"]], engine=engine, device=device, log=log
    )
    prepend = resolve_bos(bridge.tokenizer, model.bos)
    sp = S.prepare_prompts(
        bridge.tokenizer, prompts, load_neutral(files["neutral"]), prepend_bos=prepend
    )
    pad_id = int(getattr(bridge.tokenizer, "pad_token_id", None) or 0)
    run = dict(batch_size=batch_size, pad_id=pad_id)
    scales = S.residual_norms(bridge, sp.ids, hooks, skip_first=prepend, **run)
    tables = []
    for L, hook in zip(layers, hooks):
        if L not in probes:
            raise LayerscopeError(f"no probe file for layer {L} among the inputs")
        with open(probes[L], encoding="utf-8") as f:
            dirs = family_directions(json.load(f), spec["component"], spec["pooling"], probes[L])
        t = PC.causal_test(bridge, sp, L, dirs, hook=hook, alpha=causal.alpha, scale=scales[hook],
                           n_random=causal.n_random, seed=causal.seed, **run)  # fmt: skip
        t["best_layer"] = L == layers[0]
        t["component"], t["pooling"] = spec["component"], spec["pooling"]
        tables.append(t)
    table = pd.concat(tables, ignore_index=True)
    table["verdict"] = table.groupby(["layer", "direction"])["outcome"].transform(PC.verdict)
    write_csv(out_csv, table)
    log(f"causal test of {len(layers)} layer(s): {time.perf_counter() - t0:.1f} s")
    return table


# --------------------------------------------------------------------------------------------
# the probe card

CARD_COLUMNS = (
    "probe", "metric", "mean", "ci_low", "ci_high", "interpretation", "control_mean",
    "selectivity", "selectivity_ci_low", "selectivity_ci_high", "p_permutation", "p_holm", "p_bh",
    "random_direction_p95", "ece", "ece_ci_low", "ece_ci_high", "cos_logistic", "shrinkage",
    "passes_checks",
)  # fmt: skip


def probe_card(
    summary_csv: PathLike,
    causal_csvs: Sequence[PathLike],
    out_csv: PathLike,
    *,
    model: str,
    dataset: str,
    metric: str,
) -> pd.DataFrame:
    """One row per (component, pooling, probe family) at that view's best layer (by ``metric`` of
    the logistic probe): every number of the summary's primary row, then the causal test's effects,
    bands and verdict where a steering experiment tested that view's directions at that layer
    ("not tested" otherwise)."""
    from layerscope.jobs.stages import best_layer

    summary = pd.read_csv(summary_csv)
    parts = []
    for (component, pooling), _ in probe_rows(summary).groupby(["component", "pooling"]):
        best = best_layer(summary, metric=metric, component=component, pooling=pooling)
        parts.append(
            summary[
                (summary.layer == best)
                & (summary.component == component)
                & (summary.pooling == pooling)
                & summary.primary.astype(bool)
            ]
        )
    rows = pd.concat(parts, ignore_index=True)
    keep = [c for c in CARD_COLUMNS if c in rows.columns]
    recall = [c for c in rows.columns if c.startswith("recall_fpr_")]
    card = rows[["layer", "component", "pooling"] + keep[:15] + recall + keep[15:]].copy()
    card.insert(0, "dataset", dataset)
    card.insert(0, "model", model)
    card = _with_causal(card, causal_csvs)
    write_csv(out_csv, card)
    return card


def _with_causal(card: pd.DataFrame, causal_csvs: Sequence[PathLike]) -> pd.DataFrame:
    """The causal effects, bands and verdict of each card row (matched on layer, view, family)."""
    keys = ["layer", "component", "pooling", "probe"]
    cols = {"causal": "not tested (no steering experiment with answer tokens at this layer)"}
    frames = [pd.read_csv(p) for p in causal_csvs]
    if not frames:
        return card.assign(**cols)
    c = pd.concat(frames, ignore_index=True).rename(columns={"direction": "probe"})
    wide = c.groupby(keys)["verdict"].first().rename("causal").reset_index()
    for eff in PC.EFFECTS:
        e = c[c.effect == eff].groupby(keys)[["value", "band_low", "band_high"]].first()
        e.columns = [f"{eff}_effect", f"{eff}_band_low", f"{eff}_band_high"]
        wide = wide.merge(e.reset_index(), on=keys, how="left")
    card = card.merge(wide, on=keys, how="left")
    card["causal"] = card["causal"].fillna(cols["causal"])
    return card
