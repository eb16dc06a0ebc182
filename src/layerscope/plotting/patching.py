"""Figures of activation patching, drawn from the tables the patching job wrote (no model, no
torch).

Draw functions return a matplotlib Figure; :func:`layerscope.plotting.plots.save_figure` (the one
saver) writes it. Labels come from ``arrays.h5`` (:func:`read_position_labels`), so the plot job
needs only the patching outputs.

* :func:`draw_patching_heatmaps`: mean logit-difference recovery per (layer, position), one panel
  per component, one block of panels per prompt length, with a companion panel per block that draws
  the bootstrap intervals of the summary (the best position of each component, across layers);
* :func:`draw_head_heatmap`: per-head recovery at the last position;
* :func:`draw_generation_heatmap`: recovery *rate* of generation patching (share of pairs whose
  generated answer is the clean one) per (layer, position), each cell annotated with the rate and
  its Wilson interval.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from layerscope.errors import LayerscopeError
from layerscope.interventions.patching import merge_token_labels
from layerscope.plotting.plots import new_figure, save_figure

HEAD_COMPONENT = "z"
COMPONENT_ORDER = ("resid_pre", "attn_out", "mlp_out", "resid_post", "resid_mid")
COMPONENT_TITLES = {
    "resid_pre": "residual stream (block input)",
    "resid_mid": "residual stream (after attention)",
    "resid_post": "residual stream (block output)",
    "attn_out": "attention output",
    "mlp_out": "MLP output",
}


def display_token(label: str) -> str:
    """A token as a reader sees it: the decoded text without the visible-space marker, a lone
    space as ``(space)``, a newline as ``\\n``; ``BOS`` and the ``*``/``#`` markers kept."""
    star = label.endswith("*")
    core = label[:-1] if star else label
    text = core.replace("␣", " ").replace("Ġ", " ").replace("⏎", "\\n").replace("⇥", "\\t")
    shown = text.strip() or ("(space)" if text else "")
    return shown + ("*" if star else "")


def read_position_labels(h5_path: str | os.PathLike) -> tuple[dict[int, list[str]], pd.DataFrame]:
    """Axis labels per prompt length from a patching ``arrays.h5``, and where each pair differs.

    Labels follow :meth:`layerscope.interventions.patching.PatchingResult.position_labels` (a token
    shared by every pair of the length, ``#`` for digits that vary, a trailing ``*`` where some
    pair's clean and corrupted tokens differ). The table has ``pair_id, n_tokens, diff_positions``.
    """
    import h5py

    with h5py.File(h5_path, "r") as f:
        n_tok = f["n_tokens"][:].astype(int)
        clean = np.array([[t.decode() for t in row] for row in f["tokens"][:]], dtype=object)
        corr = np.array(
            [[t.decode() for t in row] for row in f["corrupted_tokens"][:]], dtype=object
        )
        pids = [p.decode() for p in f["pair_id"][:]]
    groups: dict[int, list[str]] = {}
    diffs = []
    for i, n in enumerate(n_tok):
        diffs.append(" ".join(str(p) for p in range(n) if clean[i, p] != corr[i, p]))
    for n in sorted(set(n_tok.tolist())):
        rows = np.flatnonzero(n_tok == n)
        groups[int(n)] = [
            merge_token_labels(list(clean[rows, p]), bool((clean[rows, p] != corr[rows, p]).any()))
            for p in range(n)
        ]
    return groups, pd.DataFrame({"pair_id": pids, "n_tokens": n_tok, "diff_positions": diffs})


def _corrupted_where(pairs: pd.DataFrame | None, n_tok: int) -> str:
    """'; corrupted at position 6 (4 pairs), 11 (8 pairs)' for one length group."""
    if pairs is None or "diff_positions" not in pairs.columns:
        return ""
    counts = pairs.loc[pairs["n_tokens"] == n_tok, "diff_positions"].astype(str).value_counts()
    items = sorted(counts.items(), key=lambda kv: [int(x) for x in kv[0].split()] or [0])
    return "; corrupted at position " + ", ".join(
        f"{k} ({v} pair{'s' if v != 1 else ''})" for k, v in items
    )


def _tick(labels: Sequence[str], p: int) -> str:
    """Tick label of position ``p``: its index and token (the index alone beyond them)."""
    return f"{p} {display_token(labels[p])}" if p < len(labels) else str(p)


def _components(s: pd.DataFrame) -> list[str]:
    """Components of the summary, in display order."""
    present = set(s["component"])
    return [c for c in COMPONENT_ORDER if c in present]


def _interval_panel(ax, g: pd.DataFrame, comps: Sequence[str], labels: Sequence[str]) -> None:
    """Per component, the position with the highest mean (any layer): mean and interval by layer."""
    colours = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00"]
    for k, comp in enumerate(comps):
        c = g[g["component"] == comp]
        if c["mean"].notna().sum() == 0:
            continue
        best = int(c.loc[c["mean"].idxmax(), "position"])
        line = c[c["position"] == best].sort_values("layer")
        lo = (line["mean"] - line["ci_low"]).clip(lower=0)
        hi = (line["ci_high"] - line["mean"]).clip(lower=0)
        ax.errorbar(
            line["layer"] + (k - len(comps) / 2) * 0.06,
            line["mean"],
            yerr=[lo, hi],
            marker="o",
            ms=3,
            capsize=2,
            lw=1,
            color=colours[k % len(colours)],
            label=f"{comp} at {_tick(labels, best)}",
        )
    ax.axhline(0, color="0.6", lw=0.7)
    ax.axhline(1, color="0.6", lw=0.7, ls="--")
    ax.set_xlabel("layer", fontsize=8)
    ax.set_ylabel("recovery (95% bootstrap interval)", fontsize=8)
    ax.set_title("best position of each component, with intervals", fontsize=8)
    # Outside the axes, right of the panel: inside it hid the points of the layers it covered.
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax.tick_params(labelsize=7)


def _heat_panel(
    ax, m: pd.DataFrame, cmap, vlim: float, xlabels: Sequence[str], layers: Sequence[int]
):
    """One heatmap of layer x position values on ``ax``; returns the image."""
    im = ax.imshow(
        m.to_numpy(dtype=float),
        cmap=cmap,
        vmin=-vlim,
        vmax=vlim,
        origin="lower",
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_xticks(range(len(xlabels)))
    ax.set_xticklabels(xlabels, rotation=90, fontsize=7)
    for tick, lab in zip(ax.get_xticklabels(), xlabels):
        if lab.endswith("*"):
            tick.set_color("#b2182b")
            tick.set_fontweight("bold")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(L) for L in layers], fontsize=7)
    return im


def draw_patching_heatmaps(
    summary: pd.DataFrame,
    labels: Mapping[int, Sequence[str]],
    *,
    model: str,
    experiment: str,
    pairs: pd.DataFrame | None = None,
    metric: str = "recovery",
    vlim: float = 1.0,
    warnings: Sequence[str] = (),
) -> Figure:
    """Mean ``metric`` per (layer, position), one panel per component, plus an interval panel.

    One row of panels per prompt length (positions are token indices of that length). Tick labels
    are "position token" (decoded); red ``*`` = a token that differs between clean and corrupted.
    ``pairs`` (``pair_id, n_tokens, diff_positions``) adds where the pairs were corrupted, with how
    many pairs each. The last panel of each row draws the summary's bootstrap intervals.
    """
    s = summary[(summary["metric"] == metric) & (summary["component"] != HEAD_COMPONENT)]
    if s.empty:
        raise LayerscopeError(f"no {metric} values to plot")
    comps = _components(s)
    groups = sorted(int(n) for n in s["n_tokens"].unique())
    layers = sorted(int(L) for L in s["layer"].unique())
    n_pos = max(s[s["n_tokens"] == n]["position"].nunique() for n in groups)
    pw, ph = max(3.0, 0.3 * n_pos + 1.0), 0.28 * len(layers) + 2.0
    fig = new_figure(pw * len(comps) + 3.6, ph * len(groups) + 1.0)
    axes = fig.subplots(
        len(groups),
        len(comps) + 1,
        squeeze=False,
        gridspec_kw={"width_ratios": [pw] * len(comps) + [3.0]},
    )
    cmap = colormaps["RdBu_r"].with_extremes(bad="#d0d0d0")
    im = None
    for gi, n_tok in enumerate(groups):
        g = s[s["n_tokens"] == n_tok]
        positions = sorted(int(p) for p in g["position"].unique())
        lab = list(labels.get(n_tok, []))
        xl = [_tick(lab, p) for p in positions]
        for ci, comp in enumerate(comps):
            m = (
                g[g["component"] == comp]
                .pivot_table(index="layer", columns="position", values="mean", dropna=False)
                .reindex(index=layers, columns=positions)
            )
            ax = axes[gi][ci]
            im = _heat_panel(ax, m, cmap, vlim, xl, layers)
            if ci == 0:
                ax.set_ylabel("layer", fontsize=8)
            ax.set_title(f"{COMPONENT_TITLES.get(comp, comp)} ({comp})", fontsize=8)
        _interval_panel(axes[gi][-1], g, comps, lab)
        n_pairs = int(g["n_pairs"].max())
        first_title = axes[gi][0].get_title()
        axes[gi][0].set_title("")
        axes[gi][0].set_title(
            f"{n_tok}-token prompts, {n_pairs} pair{'s' if n_pairs != 1 else ''}"
            f"{_corrupted_where(pairs, n_tok)}\n{first_title}",
            fontsize=8,
            loc="left",
        )
    cb = fig.colorbar(im, ax=axes, shrink=0.6, extend="both", pad=0.01, location="left")
    cb.set_label(
        f"mean {metric} over pairs"
        + (" (1 = clean answer restored, 0 = no effect)" if metric == "recovery" else ""),
        fontsize=8,
    )
    fig.suptitle(
        f"Activation patching (logit difference): {experiment}   (model: {model})\n"
        "clean activation patched into the corrupted run at one (layer, position); "
        "red * = token that differs between clean and corrupted; "
        "# = digit that varies across pairs" + _warning_lines(warnings),
        fontsize=9,
    )
    return fig


def draw_head_heatmap(
    summary: pd.DataFrame,
    *,
    model: str,
    experiment: str,
    metric: str = "recovery",
    vlim: float = 1.0,
) -> Figure:
    """Mean ``metric`` of per-head (``z``) patching at each group's last position: heads x layers,
    each cell annotated with the mean and its bootstrap interval."""
    s = summary[(summary["metric"] == metric) & (summary["component"] == HEAD_COMPONENT)]
    if s.empty:
        raise LayerscopeError(
            "no per-head results to plot (was the sweep run with heads=True on a model "
            "with hook_z?)"
        )
    groups = sorted(int(n) for n in s["n_tokens"].unique())
    layers = sorted(int(L) for L in s["layer"].unique())
    heads = sorted(int(h) for h in s["head"].unique())
    fig = new_figure((0.8 * len(heads) + 1.2) * len(groups) + 1.0, 0.45 * len(layers) + 2.2)
    axes = fig.subplots(1, len(groups), squeeze=False)
    cmap = colormaps["RdBu_r"].with_extremes(bad="#d0d0d0")
    im = None
    for k, n_tok in enumerate(groups):
        g = s[(s["n_tokens"] == n_tok) & (s["position"] == n_tok - 1)]
        ax = axes[0][k]
        piv = {
            v: g.pivot_table(index="layer", columns="head", values=v, dropna=False).reindex(
                index=layers, columns=heads
            )
            for v in ("mean", "ci_low", "ci_high")
        }
        im = _heat_panel(ax, piv["mean"], cmap, vlim, [str(h) for h in heads], layers)
        for (yi, xi), v in np.ndenumerate(piv["mean"].to_numpy(dtype=float)):
            if np.isfinite(v):
                lo, hi = piv["ci_low"].to_numpy()[yi, xi], piv["ci_high"].to_numpy()[yi, xi]
                ax.text(
                    xi,
                    yi,
                    f"{v:.2f}\n[{lo:.2f}, {hi:.2f}]",
                    ha="center",
                    va="center",
                    fontsize=5,
                    color="white" if abs(v) > 0.6 * vlim else "black",
                )
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer" if k == 0 else "", fontsize=8)
        tok = display_token(str(g["token"].iloc[0])) if len(g) else ""
        ax.set_title(
            f"{n_tok}-token prompts ({int(g['n_pairs'].max()) if len(g) else 0} pairs), "
            f"last position {n_tok - 1} '{tok}'",
            fontsize=8,
        )
    cb = fig.colorbar(im, ax=axes, shrink=0.9, extend="both", pad=0.02)
    cb.set_label(f"mean {metric} [95% bootstrap interval]", fontsize=8)
    fig.suptitle(
        f"Per-head patching: {experiment}   (model: {model})\n"
        "clean z of one attention head (hook_z) patched into the corrupted run",
        fontsize=9,
    )
    return fig


def _position_order(positions: Sequence[str]) -> list[str]:
    """Generation position labels in display order: indices, diff, prompt, genK, ranges."""

    def key(p: str):
        if p.lstrip("-").isdigit():
            return (0, int(p), 0)
        if p == "diff":
            return (1, 0, 0)
        if p == "prompt":
            return (2, 0, 0)
        nums = [int(x) for x in p[3:].split("-")]
        return (3 if len(nums) == 1 else 4, nums[0], nums[-1])

    return sorted(positions, key=key)


# Generation heatmap cells: this wide, with text that reads at 8 pt or more when the figure is
# scaled to 17 cm (a page width); the panels are stacked, one per row, to keep the figure narrow.
_CELL_IN = 0.95
_PAGE_IN = 17 / 2.54
_MIN_PT = 8.0


def _cell_font(fig_width_in: float) -> float:
    """Cell text size (pt) that is at least 8 pt once the figure is scaled to page width."""
    return round(_MIN_PT * max(1.0, fig_width_in / _PAGE_IN) + 0.05, 1)


def _rate_panel(ax, c: pd.DataFrame, layers, positions, xl: Sequence[str], cmap, fontsize=5):
    """One layer x position panel of recovery rates, each cell annotated ``k/n [lo,hi]``."""
    values = ("recovery_rate", "ci_low", "ci_high", "n_clean", "n_pairs")
    piv = {
        v: c.pivot_table(
            index="layer", columns="position", values=v, aggfunc="first", dropna=False
        ).reindex(index=layers, columns=positions)
        for v in values
    }
    rate = piv["recovery_rate"].to_numpy(dtype=float)
    im = ax.imshow(
        rate,
        cmap=cmap,
        vmin=0,
        vmax=1,
        origin="lower",
        aspect="auto",
        interpolation="nearest",
    )
    for (yi, xi), v in np.ndenumerate(rate):
        if np.isfinite(v):
            ax.text(
                xi,
                yi,
                f"{int(piv['n_clean'].iat[yi, xi])}/{int(piv['n_pairs'].iat[yi, xi])}\n"
                f"[{piv['ci_low'].iat[yi, xi]:.2f},{piv['ci_high'].iat[yi, xi]:.2f}]",
                ha="center",
                va="center",
                fontsize=fontsize,
                color="black" if v > 0.6 else "white",
            )
    ax.set_xticks(range(len(xl)))
    ax.set_xticklabels(xl, rotation=90, fontsize=7)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(L) for L in layers], fontsize=7)
    return im


def _group_title(ax, g: pd.DataFrame, n_tok: int) -> None:
    """Prefix the first panel's title with the group, its pairs and the rates to beat."""
    first = g.iloc[0]
    who = "every pair" if n_tok == 0 else f"{n_tok}-token prompts"
    first_title = ax.get_title(loc="left")
    ax.set_title("", loc="left")
    ax.set_title(
        f"{who}, {int(g['n_pairs'].max())} pairs; clean answer without patching: "
        f"{first['unpatched_rate']:.2f} (clean run {first['clean_run_rate']:.2f})\n"
        f"{first_title}",
        fontsize=8,
        loc="left",
    )


def draw_generation_heatmap(
    summary: pd.DataFrame,
    labels: Mapping[int, Sequence[str]] | None = None,
    *,
    model: str,
    experiment: str,
    warnings: Sequence[str] = (),
) -> Figure:
    """Recovery rate of generation patching per (layer, position), one panel per component.

    One row of panels per group: each prompt length, and ``n_tokens == 0`` (every pair: ``diff``,
    generation steps, ranges). Each cell shows the rate, ``k/n`` and the Wilson interval; the
    unpatched corrupted run's rate (the rate to beat) and the clean run's rate are in the row title.
    """
    s = summary[summary["component"] != "unpatched"]
    # cells that every pair has are drawn once, pooled (n_tokens 0); per length only prompt
    # positions
    s = s[(s["n_tokens"] == 0) | (s["position_kind"] == "prompt") | ~s["n_tokens"].eq(0).any()]
    if s.empty:
        raise LayerscopeError("no generation-patching cells to plot")
    comps = _components(s)
    groups = sorted(int(n) for n in s["n_tokens"].unique())
    layers = sorted(int(L) for L in s["layer"].unique())
    n_pos = max(s[s["n_tokens"] == n]["position"].nunique() for n in groups)
    width = max(4.5, _CELL_IN * n_pos + 2.2)
    fs = _cell_font(width)
    fig = new_figure(width, (0.4 * fs / 8 * len(layers) + 1.3) * len(groups) * len(comps) + 1.6)
    axes = fig.subplots(len(groups) * len(comps), 1, squeeze=False)
    cmap = colormaps["viridis"].with_extremes(bad="#d0d0d0")
    im = None
    for gi, n_tok in enumerate(groups):
        g = s[s["n_tokens"] == n_tok]
        positions = _position_order(list(g["position"].unique()))
        lab = list((labels or {}).get(n_tok, []))
        xl = [_tick(lab, int(p)) if p.lstrip("-").isdigit() else p for p in positions]
        for ci, comp in enumerate(comps):
            ax = axes[gi * len(comps) + ci][0]
            im = _rate_panel(ax, g[g["component"] == comp], layers, positions, xl, cmap, fs)
            ax.set_ylabel("layer", fontsize=8)
            ax.set_title(f"{COMPONENT_TITLES.get(comp, comp)} ({comp})", fontsize=8, loc="left")
        _group_title(axes[gi * len(comps)][0], g, n_tok)
    # Right of the panels: on the left it sat between the layer labels and their axis title.
    cb = fig.colorbar(im, ax=axes, shrink=0.6, pad=0.01, location="right")
    cb.set_label(
        "recovery rate: share of pairs whose generated answer is the clean one", fontsize=8
    )
    text = (
        f"Generation patching: {experiment}   (model: {model})\n"
        "clean activation patched into the corrupted run, then greedy generation; "
        "cell = pairs with the clean answer / pairs [95% Wilson interval]"
        + _kinds_shown(s)
        + _warning_lines(warnings)
    )
    chars = int(width * 72 / (9 * 0.55))  # 9-pt characters across the figure
    fig.suptitle("\n".join(textwrap.fill(line, chars) for line in text.split("\n")), fontsize=9)
    return fig


_KIND_DEFINITIONS = {
    "diff": "diff = the positions where clean and corrupted differ",
    "gen": "genK = position of the K-th generated token",
    "range": "genA-B = generated steps A to B patched at once",
}


def _kinds_shown(s: pd.DataFrame) -> str:
    """Definitions of the position kinds the figure shows, and only those."""
    kinds = set(s["position_kind"]) if "position_kind" in s.columns else set()
    defs = [text for kind, text in _KIND_DEFINITIONS.items() if kind in kinds]
    return "\n" + "; ".join(defs) if defs else ""


def _warning_lines(warnings: Sequence[str]) -> str:
    from layerscope.plotting.plots import warning_text

    return "\n" + warning_text(warnings) if warnings else ""


# --------------------------------------------------------------------------------------------
# drawn and saved with the one saver


def _first_target(out: str | os.PathLike, formats: Sequence[str]) -> Path:
    """``out`` with the first format's extension (its own suffix dropped if it is a format)."""
    out = Path(out)
    stem = (
        out.with_suffix("")
        if out.suffix.lstrip(".").lower() in {f.lower() for f in formats}
        else out
    )
    return stem.parent / f"{stem.name}.{formats[0]}"


def _write(fig, out: str | os.PathLike, formats: Sequence[str]) -> list[Path]:
    """Write ``fig`` as ``out`` in every format (:func:`_first_target`), then drop its artists."""
    try:
        first = _first_target(out, formats)
        return [Path(p) for p in save_figure(fig, first, formats, dpi=150, tight=True)]
    finally:
        fig.clear()


def _pairs_where(pairs: pd.DataFrame | None) -> pd.DataFrame | None:
    """The columns of ``pairs`` that say where each pair differs (None without them)."""
    if pairs is None or "diff_positions" not in pairs.columns:
        return None
    return pairs[["pair_id", "n_tokens", "diff_positions"]]


def plot_patching_heatmaps(
    summary: pd.DataFrame,
    tokens,
    out: str | os.PathLike,
    *,
    model: str,
    experiment: str,
    formats: Sequence[str] = ("png",),
    metric: str = "recovery",
    vlim: float = 1.0,
    pairs: pd.DataFrame | None = None,
) -> list[Path]:
    """Draw :func:`draw_patching_heatmaps` and save it; ``tokens``: labels per length
    (``{n_tokens: labels}`` as from
    :meth:`layerscope.interventions.patching.PatchingResult.position_labels`) or one list."""
    if tokens is None:
        labels: dict[int, list[str]] = {}
    elif isinstance(tokens, Mapping):
        labels = {int(k): list(v) for k, v in tokens.items()}
    else:
        labels = {len(tokens): list(tokens)}
    fig = draw_patching_heatmaps(
        summary,
        labels,
        model=model,
        experiment=experiment,
        pairs=_pairs_where(pairs),
        metric=metric,
        vlim=vlim,
    )
    return _write(fig, out, formats)


def plot_head_heatmap(
    summary: pd.DataFrame,
    out: str | os.PathLike,
    *,
    model: str,
    experiment: str,
    formats: Sequence[str] = ("png",),
    metric: str = "recovery",
    vlim: float = 1.0,
) -> list[Path]:
    """Draw :func:`draw_head_heatmap` (last position) and save it."""
    fig = draw_head_heatmap(summary, model=model, experiment=experiment, metric=metric, vlim=vlim)
    return _write(fig, out, formats)
