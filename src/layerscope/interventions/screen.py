"""The screen: attribution ranks every cell, exact patching verifies the top ``k`` and a seeded
uniform sample of ``m`` of the rest, and the miss rate of the unverified cells is stated.

A *cell* here is one (n_tokens, component, layer, position, head) of the summary across pairs:
its ``atp`` is the mean over pairs of the attribution recovery (bootstrap interval over pairs), its
``exact`` the mean over the same pairs of the exact sweep's recovery. Cells are ranked by
``|atp|`` (1 = largest). ``q`` / ``k`` cells (QK fix) have no exact counterpart in the sweep; they
are ranked but never verified.

Miss rate: ``X`` = the smallest ``|exact|`` among the verified top-k cells. Among the random sample
(uniform over the cells outside the top k), ``j`` of ``m`` have ``|exact| > X``; the Wilson
interval of ``j / m`` bounds the share of unverified cells whose effect exceeds ``X``:
"at most Y % (95 %) of the unverified cells have an effect larger than X".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from layerscope.analysis.power import wilson_interval
from layerscope.errors import LayerscopeError
from layerscope.interventions import patching as P

__all__ = [
    "ATTRIBUTION_COLUMNS",
    "attribution_table",
    "attribution_table_from_means",
    "correlations",
    "miss_rate",
    "select_cells",
    "with_exact",
]

KEY = ["n_tokens", "component", "layer", "position", "head"]
ATTRIBUTION_COLUMNS = (
    "n_tokens",
    "component",
    "layer",
    "position",
    "head",
    "token",
    "atp",
    "atp_ci_low",
    "atp_ci_high",
    "exact",
    "verified",
    "sample",
    "rank",
)
UNVERIFIABLE = ("q", "k")


def attribution_table(cells: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """One row per cell: mean attribution recovery over pairs with its bootstrap interval, and
    its rank by ``|atp|`` (ties by the key order; NaN cells, e.g. undefined recovery, last)."""
    summ = P.summarize(cells, n_boot=n_boot, seed=seed)
    summ = summ[summ["metric"] == "recovery"].rename(
        columns={"mean": "atp", "ci_low": "atp_ci_low", "ci_high": "atp_ci_high"}
    )
    return attribution_table_from_means(
        summ[KEY + ["token", "atp", "atp_ci_low", "atp_ci_high"]].reset_index(drop=True)
    )


def attribution_table_from_means(cells: pd.DataFrame) -> pd.DataFrame:
    """Rank cells (``KEY``, ``token``, ``atp``, optional CIs) by ``|atp|`` and add the empty
    ``exact``, ``verified`` and ``sample`` columns."""
    out = cells.reset_index(drop=True).copy()
    for col in ("atp_ci_low", "atp_ci_high"):
        if col not in out:
            out[col] = np.nan
    mag = out["atp"].abs().fillna(-1.0)
    order = np.lexsort((np.arange(len(out)), -mag.to_numpy()))
    rank = np.empty(len(out), dtype=np.int64)
    rank[order] = np.arange(1, len(out) + 1)
    out["rank"] = rank
    out["exact"] = np.nan
    out["verified"] = False
    out["sample"] = ""
    return out.sort_values("rank", kind="stable").reset_index(drop=True)


def select_cells(table: pd.DataFrame, top_k: int, n_random: int, seed: int) -> pd.DataFrame:
    """Mark the top ``top_k`` verifiable cells (``sample == "top"``) and a seeded uniform sample
    of ``n_random`` of the other verifiable cells (``sample == "random"``)."""
    out = table.copy()
    ok = ~out["component"].isin(UNVERIFIABLE) & out["atp"].notna()
    cand = np.flatnonzero(ok.to_numpy())  # already in rank order
    top = cand[: int(top_k)]
    rest = cand[int(top_k) :]
    rng = np.random.default_rng(seed)
    pick = rng.choice(rest, size=min(int(n_random), len(rest)), replace=False) if len(rest) else []
    out.loc[out.index[top], "sample"] = "top"
    out.loc[out.index[np.sort(np.asarray(pick, dtype=np.int64))], "sample"] = "random"
    return out


def verify_keys(table: pd.DataFrame) -> set[tuple]:
    """The (n_tokens, component, layer, position, head) cells :func:`select_cells` marked."""
    sel = table[table["sample"] != ""]
    return {
        (int(r.n_tokens), str(r.component), int(r.layer), int(r.position), int(r.head))
        for r in sel.itertuples()
    }


def with_exact(table: pd.DataFrame, exact: pd.DataFrame) -> pd.DataFrame:
    """``table`` with ``exact`` (mean exact recovery over pairs) and ``verified`` filled from a
    verification sweep's tidy rows (``exact``: :attr:`PatchingResult.df`)."""
    rec = exact[exact["metric"] == "recovery"]
    mean = rec.groupby(KEY)["value"].mean()
    out = table.copy()
    idx = pd.MultiIndex.from_frame(out[KEY])
    vals = mean.reindex(idx).to_numpy()
    hit = mean.index.isin(idx)
    if not hit.all():
        raise LayerscopeError("verification returned cells the screen did not select")
    marked = (out["sample"] != "").to_numpy()
    out["exact"] = np.where(marked, vals, np.nan)
    out["verified"] = marked & np.isfinite(out["exact"].to_numpy())
    return out


def _rows_corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of x with the same row of y (NaN for a constant row)."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    den = np.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (xc * yc).sum(-1) / den, np.nan)


def _boot_corr(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int, method: str):
    """Correlation of x and y with a percentile bootstrap interval over cells (95 %); Spearman
    is Pearson of the (average-tie) ranks, re-ranked within each resample."""
    from scipy.stats import rankdata

    def corr(a, b):
        if method == "spearman":
            a, b = rankdata(a, axis=-1), rankdata(b, axis=-1)
        return _rows_corr(a, b)

    if len(x) < 3:
        return np.nan, np.nan, np.nan
    est = float(corr(x[None], y[None])[0])
    if not np.isfinite(est) or n_boot < 1:
        return est, np.nan, np.nan
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    boot = corr(x[idx], y[idx])
    boot = boot[np.isfinite(boot)]
    if not len(boot):
        return est, np.nan, np.nan
    return est, float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def correlations(table: pd.DataFrame, n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Spearman and Pearson of atp vs exact over the verified cells, per component and for all
    of them together, each with a bootstrap interval over cells."""
    ver = table[table["verified"]]
    groups = [(c, g) for c, g in ver.groupby("component", sort=True)] + [("all", ver)]
    rows = []
    for comp, g in groups:
        x, y = g["atp"].to_numpy(np.float64), g["exact"].to_numpy(np.float64)
        row: dict[str, Any] = {"component": comp, "n_cells": int(len(g))}
        for method in ("spearman", "pearson"):
            est, lo, hi = _boot_corr(x, y, n_boot, seed, method)
            row.update({method: est, f"{method}_ci_low": lo, f"{method}_ci_high": hi})
        row["mean_abs_error"] = float(np.mean(np.abs(x - y))) if len(g) else np.nan
        rows.append(row)
    return rows


def miss_rate(table: pd.DataFrame, confidence: float = 0.95) -> dict[str, Any]:
    """The share of the random sample whose ``|exact|`` exceeds the smallest verified top-k
    ``|exact|`` (``X``), with its Wilson interval, and the sentence that states it."""
    top = table[(table["sample"] == "top") & table["verified"]]
    rnd = table[(table["sample"] == "random") & table["verified"]]
    n_unverified = int((~table["verified"]).sum())
    if top.empty or rnd.empty:
        return {
            "threshold": np.nan,
            "n_sample": int(len(rnd)),
            "n_exceed": 0,
            "rate": np.nan,
            "ci_low": np.nan,
            "ci_high": np.nan,
            "n_unverified": n_unverified,
            "statement": "no miss rate: the screen verified no top-k or no random cells",
        }
    x = float(top["exact"].abs().min())
    j = int((rnd["exact"].abs() > x).sum())
    lo, hi = wilson_interval(j, len(rnd), confidence)
    lo, hi = float(np.asarray(lo)), float(np.asarray(hi))
    pct = f"{100 * confidence:g}"
    statement = (
        f"at most {100 * hi:.1f} % ({pct} %) of the {n_unverified} unverified cells have an "
        f"effect larger than {x:.3g} (recovery; {j} of {len(rnd)} random cells exceed it)"
    )
    return {
        "threshold": x,
        "n_sample": int(len(rnd)),
        "n_exceed": j,
        "rate": j / len(rnd),
        "ci_low": lo,
        "ci_high": hi,
        "n_unverified": n_unverified,
        "statement": statement,
    }


def degenerate(table: pd.DataFrame) -> str | None:
    """A named warning when every estimate is zero or undefined (never silent)."""
    atp = table["atp"].to_numpy(np.float64)
    if not np.isfinite(atp).any():
        return "degenerate attribution: every estimate is NaN (no pair has an LD gap)"
    if np.all(atp[np.isfinite(atp)] == 0):
        return "degenerate attribution: every estimate is exactly zero"
    return None


def summary(table: pd.DataFrame, info: Mapping[str, Any], corr, miss) -> dict[str, Any]:
    """The content of ``attribution_summary.json``."""
    return {
        "method": info.get("method_requested", "attribution"),
        "n_cells": int(len(table)),
        "n_verified": int(table["verified"].sum()),
        "correlations": corr,
        "miss_rate": miss,
        "degenerate": degenerate(table),
        "passes_per_pair": {
            "forward": info.get("forward_passes_per_pair"),
            "backward": info.get("backward_passes_per_pair"),
        },
        "seconds_per_pair": info.get("seconds_per_pair"),
        "verification_seconds": info.get("verification_seconds"),
        "settings": {
            k: info.get(k) for k in ("qk_fix", "grad_drop", "top_k", "n_random", "seed", "n_boot")
        },
    }
