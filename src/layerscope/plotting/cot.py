"""Figures along the chain of thought: lens heatmap, lead-time distributions, early-answering curves
(tables of :mod:`layerscope.jobs.cot_run`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from layerscope.plotting.plots import DEFAULT_DPI, new_figure, palette, save_figure, style

#: label order of the panels: unfaithful first, so "difference" reads faithful minus unfaithful
_ORDER = ("unfaithful", "faithful")


def _labels(values) -> list[str]:
    uniq = [v for v in pd.unique(values) if v != "difference"]
    return sorted(uniq, key=lambda v: (_ORDER.index(v) if v in _ORDER else len(_ORDER), v))


def _finish(fig: Figure, out, formats, dpi) -> list[str]:
    try:
        return save_figure(fig, out, formats, dpi, tight=True)
    finally:
        fig.clear()


def _bin_tick(b: int, bins: Sequence[int]) -> str:
    """Q (the question), the reasoning bins' centres, A (the position that writes the answer)."""
    n = max(bins)
    if b < 0:
        return "Q"
    return "A" if b == n else f"{(b + 0.5) / n:.2f}"


def draw_lens_heatmap(summary: pd.DataFrame, *, title: str = "") -> Figure:
    """Mean answer log-prob, layers x relative-position bins, one panel per (lens, label)."""
    lenses = list(pd.unique(summary["lens"]))
    labels = _labels(summary["label"])
    bins = sorted(summary["bin"].unique())
    layers = sorted(summary["layer"].unique())
    vmin, vmax = float(summary["mean_logprob"].min()), 0.0
    with style():
        fig = new_figure(3.2 * len(labels) + 1.0, 2.6 * len(lenses) + 0.6)
        axes = fig.subplots(len(lenses), len(labels), squeeze=False)
        im = None
        for i, name in enumerate(lenses):
            for j, label in enumerate(labels):
                ax = axes[i][j]
                g = summary[(summary["lens"] == name) & (summary["label"] == label)]
                M = np.full((len(layers), len(bins)), np.nan)
                for r in g.itertuples(index=False):
                    M[layers.index(r.layer), bins.index(r.bin)] = r.mean_logprob
                im = ax.imshow(M, aspect="auto", origin="lower", vmin=vmin, vmax=vmax)
                ax.grid(False)
                ticks = [_bin_tick(b, bins) for b in bins]
                step = max(1, len(bins) // 6)
                shown = sorted({0, len(bins) - 1, *range(0, len(bins), step)})
                ax.set_xticks(shown, [ticks[k] for k in shown])
                ax.set_yticks(range(len(layers)), [str(L) for L in layers])
                ax.set_title(f"{name} lens, {label} (n={int(g['n_prompts'].max())})", fontsize=9)
                ax.set_xlabel("relative position (Q question, A answer)")
                ax.set_ylabel("layer")
        fig.colorbar(im, ax=axes, label="answer log-prob (mean over prompts)", shrink=0.8)
        if title:
            fig.suptitle(title)
    return fig


def draw_lead_time(lead: pd.DataFrame, summary: pd.DataFrame, *, title: str = "") -> Figure:
    """Lead-time distributions by label (points: prompts; bars: median and bootstrap interval),
    one panel per readout, layers along x."""
    readouts = list(pd.unique(lead["readout"]))
    labels = _labels(lead["label"])
    colors = palette(len(labels))
    with style():
        fig = new_figure(max(4.0, 3.6 * len(readouts)), 3.2)
        axes = fig.subplots(1, len(readouts), squeeze=False)[0]
        for ax, name in zip(axes, readouts):
            d = lead[(lead["readout"] == name) & lead["decodable"]]
            s = summary[summary["readout"] == name]
            layers = sorted(lead.loc[lead["readout"] == name, "layer"].unique())
            for k, label in enumerate(labels):
                off = (k - (len(labels) - 1) / 2) * 0.3
                x = [layers.index(L) + off for L in d.loc[d["label"] == label, "layer"]]
                ax.scatter(
                    x, d.loc[d["label"] == label, "lead_tokens"], s=8, alpha=0.35, color=colors[k]
                )
                sl = s[s["label"] == label].set_index("layer").reindex(layers)
                xs = np.arange(len(layers)) + off
                ax.errorbar(
                    xs,
                    sl["median"],
                    yerr=[sl["median"] - sl["ci_low"], sl["ci_high"] - sl["median"]],
                    fmt="o",
                    color=colors[k],
                    label=f"{label} median",
                    capsize=2,
                )
            ax.set_xticks(range(len(layers)), [str(L) for L in layers])
            ax.set_xlim(-0.5, len(layers) - 0.5)
            ax.set_xlabel("layer")
            ax.set_ylabel("lead time (tokens before the answer)")
            ax.set_title(name, fontsize=9)
            ax.legend(fontsize=7)
        if title:
            fig.suptitle(title)
    return fig


def draw_early_answering(summary: pd.DataFrame, *, title: str = "") -> Figure:
    """Share of answers equal to the full-chain answer against the share of reasoning kept,
    truncated vs filler with Wilson bands, one panel per label."""
    labels = _labels(summary["label"])
    conds = ["truncated", "filler"]
    colors = palette(len(conds))
    with style():
        fig = new_figure(3.4 * len(labels), 3.0)
        axes = fig.subplots(1, len(labels), squeeze=False, sharey=True)[0]
        for ax, label in zip(axes, labels):
            for k, c in enumerate(conds):
                g = summary[(summary["label"] == label) & (summary["condition"] == c)]
                g = g.sort_values("fraction")
                ax.plot(g["fraction"], g["rate"], marker="o", color=colors[k], label=c)
                ax.fill_between(
                    g["fraction"], g["ci_low"], g["ci_high"], color=colors[k], alpha=0.2
                )
            n = int(summary.loc[summary["label"] == label, "n"].max())
            ax.set_title(f"{label} (n={n})", fontsize=9)
            ax.set_xlabel("share of the reasoning kept")
            ax.set_ylim(-0.03, 1.03)
            ax.legend(fontsize=7)
        axes[0].set_ylabel("answer = full-chain answer")
        if title:
            fig.suptitle(title)
    return fig


def lens_heatmap(summary, out, *, title="", formats: Sequence[str] = ("png",), dpi=DEFAULT_DPI):
    """Draw and save :func:`draw_lens_heatmap`."""
    return _finish(draw_lens_heatmap(summary, title=title), out, formats, dpi)


def lead_time(lead, summary, out, *, title="", formats: Sequence[str] = ("png",), dpi=DEFAULT_DPI):
    """Draw and save :func:`draw_lead_time`."""
    return _finish(draw_lead_time(lead, summary, title=title), out, formats, dpi)


def early_answering(summary, out, *, title="", formats: Sequence[str] = ("png",), dpi=DEFAULT_DPI):
    """Draw and save :func:`draw_early_answering`."""
    return _finish(draw_early_answering(summary, title=title), out, formats, dpi)
