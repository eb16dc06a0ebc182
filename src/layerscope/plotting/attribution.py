"""Figures of attribution patching, drawn from ``attribution.csv`` (no model, no torch).

* :func:`draw_attribution_heatmaps`: mean attribution recovery per (layer, position), one panel per
  component, for the most common prompt length;
* :func:`draw_attribution_heads`: per-head attribution, heads x layers, for each head kind (z, and
  q / k with the QK fix) at the last position and at each head's strongest position;
* :func:`draw_attribution_scatter`: estimate against exact recovery of the verified cells, with the
  identity line and the correlations in the title.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from layerscope.plotting.plots import new_figure, palette

HEAD_KINDS = ("z", "q", "k")
HEAD_TITLES = {"z": "head output z", "q": "query (QK fix)", "k": "key (QK fix)"}


def _main_group(table: pd.DataFrame) -> tuple[int, pd.DataFrame]:
    """The prompt length with the most cells, and its rows."""
    n_tok = int(table["n_tokens"].value_counts().idxmax())
    return n_tok, table[table["n_tokens"] == n_tok]


def _limit(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def _heat(fig, ax, grid: np.ndarray, xlabels: Sequence[str], ylabels: Sequence[Any], title: str):
    lim = _limit(grid)
    im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower")
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=90, fontsize=6)
    ax.set_yticks(range(len(ylabels)), [str(y) for y in ylabels], fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8, label="attribution recovery")


def draw_attribution_heatmaps(table: pd.DataFrame, *, model: str, experiment: str) -> Figure:
    """Layers x positions of the mean attribution recovery, one panel per component."""
    n_tok, g = _main_group(table[table["head"] == -1])
    comps = list(dict.fromkeys(g["component"]))
    fig = new_figure(max(6.0, 0.25 * n_tok + 3), 2.6 * max(1, len(comps)))
    axes = fig.subplots(max(1, len(comps)), 1, squeeze=False)[:, 0]
    tokens = g.drop_duplicates("position").set_index("position")["token"].astype(str)
    positions = sorted(g["position"].unique())
    xl = [f"{p}:{tokens.get(p, '')}" for p in positions]
    for ax, comp in zip(axes, comps):
        c = g[g["component"] == comp]
        layers = sorted(c["layer"].unique())
        grid = c.pivot_table(index="layer", columns="position", values="atp").reindex(
            index=layers, columns=positions
        )
        _heat(fig, ax, grid.to_numpy(np.float64), xl, layers, comp)
        ax.set_ylabel("layer")
    fig.suptitle(f"attribution patching: {model}, {experiment} ({n_tok} tokens)", fontsize=10)
    return fig


def _head_grid(c: pd.DataFrame, layers, heads, strongest: bool) -> np.ndarray:
    """heads x layers: atp at the last position, or at each head's strongest position."""
    grid = np.full((len(heads), len(layers)), np.nan)
    if strongest:
        c = c.loc[c["atp"].abs().fillna(-1).groupby([c["layer"], c["head"]]).idxmax()]
    else:
        c = c[c["position"] == c["position"].max()]
    for r in c.itertuples():
        grid[heads.index(r.head), layers.index(r.layer)] = r.atp
    return grid


def draw_attribution_heads(table: pd.DataFrame, *, model: str, experiment: str) -> Figure:
    """heads x layers per head kind: at the last position and at each head's strongest one."""
    n_tok, g = _main_group(table[table["head"] >= 0])
    kinds = [k for k in HEAD_KINDS if (g["component"] == k).any()]
    fig = new_figure(9.0, 2.8 * max(1, len(kinds)))
    axes = fig.subplots(max(1, len(kinds)), 2, squeeze=False)
    for row, kind in zip(axes, kinds):
        c = g[g["component"] == kind]
        layers, heads = sorted(c["layer"].unique()), sorted(c["head"].unique())
        for ax, strongest in zip(row, (False, True)):
            where = "strongest position" if strongest else "last position"
            grid = _head_grid(c, layers, heads, strongest)
            _heat(fig, ax, grid, [str(L) for L in layers], heads, f"{HEAD_TITLES[kind]}, {where}")
            ax.set_xlabel("layer")
            ax.set_ylabel("head")
    fig.suptitle(f"attribution per head: {model}, {experiment} ({n_tok} tokens)", fontsize=10)
    return fig


def draw_attribution_scatter(
    table: pd.DataFrame, summary: Mapping[str, Any], *, model: str, experiment: str
) -> Figure:
    """Estimate (atp) against exact recovery of the verified cells, coloured by component."""
    ver = table[table["verified"].astype(bool)]
    fig = new_figure(5.5, 5.0)
    ax = fig.subplots()
    comps = list(dict.fromkeys(ver["component"]))
    for color, comp in zip(palette(max(1, len(comps))), comps):
        c = ver[ver["component"] == comp]
        ax.scatter(c["exact"], c["atp"], s=14, color=color, label=comp, alpha=0.8)
    both = np.concatenate([ver["exact"].to_numpy(float), ver["atp"].to_numpy(float)])
    lim = _limit(both) * 1.05
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--", label="identity")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel("exact recovery (patched)")
    ax.set_ylabel("attribution estimate (atp)")
    ax.legend(fontsize=7)
    overall = next((r for r in summary.get("correlations", []) if r["component"] == "all"), {})
    corr = (
        f"Spearman {overall.get('spearman', float('nan')):.2f}, "
        f"Pearson {overall.get('pearson', float('nan')):.2f}, n = {len(ver)}"
    )
    ax.set_title(f"{model}, {experiment}: estimate vs exact\n{corr}", fontsize=9)
    return fig
