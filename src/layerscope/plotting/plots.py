"""Publication-quality figures (matplotlib only, no pyplot state, Agg canvas).

Every public function takes arrays / DataFrames plus an output path ``out``, draws through a
``_draw_*`` function that returns the :class:`~matplotlib.figure.Figure` (so tests can inspect
the laid-out artists), and saves it with :func:`save_figure`:

* ``out`` itself is always written (its suffix picks the format; no suffix means ``.png``);
  every extra format in ``formats`` (e.g. ``("png", "svg", "pdf")``) is written next to it
  with the same stem. The written paths are returned, ``out`` first.
* Each file is rendered to a temporary file in the same directory (with the right extension)
  and moved into place with ``os.replace``, so a crash never leaves a half-written figure.
* Output is deterministic: no timestamps in PDF/SVG metadata, fixed SVG ids, seeded layouts.

Figures are created as plain :class:`~matplotlib.figure.Figure` objects on an Agg canvas --
they never enter pyplot's figure registry, so nothing leaks and ``plt.get_fignums()`` stays
empty, and no GUI backend is ever touched.

Style: :func:`style` (a ``rc_context``) sets fonts, grid and a colorblind-safe palette
(:func:`palette`: Okabe-Ito for up to 8 classes, tab10 up to 10, tab20 up to 20, then
tab20+tab20b+tab20c). Tick labels never overlap: heatmaps grow with the number of rows up to a
cap, beyond which the labels are thinned; long labels are shortened with an ellipsis.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from cycler import cycler
from matplotlib import colormaps, rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, LogNorm, Normalize, TwoSlopeNorm, to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from layerscope.atomic import atomic_path

__all__ = [
    "OKABE_ITO",
    "style",
    "palette",
    "save_figure",
    "relative_depth",
    "centered_cosine",
    "label_mean_cosine",
    "pca_2d",
    "tsne_2d",
    "tsne_perplexity",
    "shorten",
    "metric_name",
    "metric_vs_layer",
    "pca_grid",
    "tsne_grid",
    "cosine_heatmap",
    "label_mean_matrix",
    "norm_heatmap",
    "norm_curves",
    "generalization_matrix",
    "best_layer_vs_depth",
    "steering_dose_response",
]

#: Okabe & Ito (2008) colorblind-safe qualitative palette (black last: it is used for highlights).
OKABE_ITO = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]
DEFAULT_DPI = 170
FONT_SIZE = 9.0
TICK_SIZE = 8.0
MAX_LABEL_CHARS = 24
# Heatmap geometry (inches): the matrix grows with the rows so one-row label ticks stay legible.
_HEATMAP_MIN_SIDE = 4.0
_HEATMAP_MAX_SIDE = 16.0
_ROW_PITCH = 1.3  # minimal distance between tick label centres, in units of the tick font size
_MAX_PROMPT_TICKS = 60  # prompt ids are written next to the rows only up to this many prompts

_RC = {
    "font.size": FONT_SIZE,
    "axes.titlesize": FONT_SIZE + 1,
    "axes.labelsize": FONT_SIZE,
    "xtick.labelsize": TICK_SIZE,
    "ytick.labelsize": TICK_SIZE,
    "legend.fontsize": TICK_SIZE,
    "legend.title_fontsize": TICK_SIZE,
    "figure.titlesize": FONT_SIZE + 2,
    "axes.grid": True,
    "grid.color": "#d9d9d9",
    "grid.linewidth": 0.6,
    "grid.alpha": 1.0,
    "axes.axisbelow": True,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.linewidth": 0.8,
    "lines.linewidth": 1.6,
    "lines.markersize": 4.5,
    "legend.frameon": True,
    "legend.framealpha": 0.9,
    "legend.edgecolor": "#cccccc",
    "image.interpolation": "nearest",
    "savefig.dpi": DEFAULT_DPI,
    "savefig.facecolor": "white",
    "figure.facecolor": "white",
    "svg.hashsalt": "layerscope",
    "svg.fonttype": "path",
    "pdf.fonttype": 42,
    "axes.prop_cycle": cycler(color=OKABE_ITO),
}


@contextlib.contextmanager
def style() -> Iterator[None]:
    """The house style as an ``rc_context`` (fonts, light grid, no top/right spines, palette)."""
    with rc_context(_RC):
        yield


def palette(n: int) -> list:
    """``n`` distinguishable colours: Okabe-Ito (<= 8), tab10 (<= 10), tab20 (<= 20), else 60
    cycled."""
    if n <= len(OKABE_ITO):
        return list(OKABE_ITO[:n])
    if n <= 10:
        return list(colormaps["tab10"].colors[:n])
    if n <= 20:
        return list(colormaps["tab20"].colors[:n])
    pool = (
        list(colormaps["tab20"].colors)
        + list(colormaps["tab20b"].colors)
        + list(colormaps["tab20c"].colors)
    )
    return [pool[i % len(pool)] for i in range(n)]


METRIC_NAMES = {
    "auroc": "AUROC",
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "f1": "F1",
}
_BOUNDED = tuple(METRIC_NAMES)


def metric_name(metric: str) -> str:
    """How a metric is written on axes and titles (``auroc`` -> ``AUROC``)."""
    return METRIC_NAMES.get(metric, metric)


def metric_axis_label(metric: str, n_classes: int | None = None) -> str:
    """Axis label of a metric; for more than two classes it says how the classes are averaged."""
    name = metric_name(metric)
    if n_classes is not None and n_classes > 2:
        if metric == "auroc":
            return f"{name} (one-vs-rest, macro mean over {n_classes} classes)"
        if metric == "f1":
            return f"{name} (macro mean over {n_classes} classes)"
    return name


def _n_classes(df: pd.DataFrame) -> int | None:
    """The class count of a probe summary (from its ``n_per_class`` JSON), or None."""
    if "n_per_class" not in df.columns or df.empty:
        return None
    try:
        return len(json.loads(str(df["n_per_class"].iloc[0])))
    except (ValueError, TypeError):
        return None


def relative_depth(layer, n_layers):
    """``layer / n_layers`` -- the depth convention of every "relative depth" axis here."""
    return np.asarray(layer, dtype=np.float64) / float(n_layers)


# ------------------------------------------------------------------------------------------
# saving
# ------------------------------------------------------------------------------------------

_SUPPORTED = ("png", "svg", "pdf", "eps", "ps", "jpg", "jpeg", "tif", "tiff", "webp")


def _targets(out: str | os.PathLike, formats: Sequence[str]) -> list[Path]:
    out = Path(out)
    fmt = out.suffix[1:].lower()
    if not fmt:
        out, fmt = out.with_suffix(".png"), "png"
    if fmt not in _SUPPORTED:
        raise ValueError(f"{out}: unsupported figure format {fmt!r} (use one of {_SUPPORTED})")
    if isinstance(formats, str):
        formats = (formats,)
    targets = [out]
    for f in formats:
        f = f.lower().lstrip(".")
        if f not in _SUPPORTED:
            raise ValueError(f"unsupported figure format {f!r} (use one of {_SUPPORTED})")
        t = out.with_suffix("." + f)
        if t not in targets:
            targets.append(t)
    return targets


def save_figure(
    fig: Figure,
    out: str | os.PathLike,
    formats: Sequence[str] = ("png",),
    dpi: float = DEFAULT_DPI,
    *,
    tight: bool = False,
) -> list[str]:
    """Write ``fig`` atomically to ``out`` and to ``out`` with each suffix in ``formats``.

    The project's one figure writer (``patching`` and ``task_vectors`` use it too). PDF and SVG
    carry no dates, so reruns give identical files. ``tight`` crops to the drawn artists.
    """
    written = []
    for target in _targets(out, formats):
        fmt = target.suffix[1:].lower()
        meta: dict[str, Any] = {}
        if fmt == "pdf":
            meta = {"CreationDate": None, "ModDate": None}
        elif fmt == "svg":
            meta = {"Date": None}
        with atomic_path(target) as tmp, style():
            fig.savefig(
                tmp,
                format=fmt,
                dpi=dpi,
                metadata=meta or None,
                bbox_inches="tight" if tight else None,
            )
        written.append(str(target))
    return written


def _finish(fig: Figure, out, formats, dpi) -> list[str]:
    try:
        # tight: outer labels (colourbar, side labels) must never be clipped
        return save_figure(fig, out, formats, dpi, tight=True)
    finally:
        fig.clear()  # drop artists now rather than at garbage collection


# ------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------


def new_figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def shorten(text: Any, max_chars: int = MAX_LABEL_CHARS) -> str:
    """``str(text)`` cut to ``max_chars`` characters, ending with an ellipsis when cut."""
    s = str(text)
    return s if len(s) <= max_chars else s[: max(1, max_chars - 1)].rstrip() + "\u2026"


def _title(
    what: str,
    *,
    model=None,
    dataset=None,
    layer=None,
    component=None,
    pooling=None,
    extra: str | None = None,
) -> str:
    parts = [p for p in (model, dataset) if p not in (None, "")]
    if layer is not None:
        parts.append(f"layer {layer}")
    cp = " / ".join(str(p) for p in (component, f"{pooling} pooling" if pooling else None) if p)
    if cp:
        parts.append(cp)
    line2 = " \u00b7 ".join(str(p) for p in parts)
    text = what if not line2 else f"{what}\n{line2}"
    if extra:
        text += f"\n{extra}"
    return text


def warning_text(warnings: Sequence[str], width: int = 90) -> str:
    """The named warnings of a job's summary as subtitle lines ("" when there are none): each
    warning's first clause (its name and what was found); the fix that follows the first ";"
    stays in the summary and the log, so a long warning does not crowd out the panels."""
    lines = []
    for w in warnings:
        head, sep, _ = w.partition(";")
        text = f"WARNING {head}" + (" (the fix: see the job's summary)" if sep else "")
        lines.append(textwrap.fill(text, width))
    return "\n".join(lines)


def _suptitle(fig: Figure, text: str) -> None:
    width_chars = max(30, int(fig.get_figwidth() * 72 / (FONT_SIZE * 0.6)))
    lines = [textwrap.fill(line, width_chars) for line in text.split("\n")]
    fig.suptitle("\n".join(lines), fontsize=FONT_SIZE + 1)


def _classes(labels: Sequence[Any]) -> tuple[list, np.ndarray]:
    """Sorted classes and each item's class code (the order every figure uses)."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    classes, codes = np.unique(y, return_inverse=True)
    return [c.item() if isinstance(c, np.generic) else c for c in classes], codes.astype(np.int64)


def _blocks(codes_sorted: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs ``(code, start, stop)`` of equal codes in an already sorted code vector."""
    out = []
    start = 0
    for i in range(1, len(codes_sorted) + 1):
        if i == len(codes_sorted) or codes_sorted[i] != codes_sorted[start]:
            out.append((int(codes_sorted[start]), start, i))
            start = i
    return out


def _thin(positions: Sequence[float], min_gap: float) -> list[int]:
    """Indices of positions to keep (greedy, in order) so kept neighbours are >= min_gap apart."""
    keep: list[int] = []
    last = -math.inf
    for i, p in enumerate(positions):
        if p - last >= min_gap - 1e-9:
            keep.append(i)
            last = p
    return keep


def _row_side(
    n_rows: int,
    centres: Sequence[float],
    base: float = _HEATMAP_MIN_SIDE,
    cap: float = _HEATMAP_MAX_SIDE,
) -> float:
    """Side (inches) of a matrix with ``n_rows`` rows whose tick labels sit at ``centres``
    (rows)."""
    if len(centres) < 2:
        return base
    gap_rows = float(np.min(np.diff(np.asarray(centres, dtype=float))))
    need = n_rows * (_ROW_PITCH * TICK_SIZE / 72.0) / max(gap_rows, 1e-9)
    return float(min(cap, max(base, need)))


def _set_row_ticks(
    axis, centres: Sequence[float], texts: Sequence[str], side_in: float, n_rows: int, **kw
) -> None:
    """Ticks at row ``centres`` with ``texts``, thinned if the side is too short to hold them
    all."""
    pt_per_row = side_in * 72.0 / max(n_rows, 1)
    keep = _thin(centres, _ROW_PITCH * TICK_SIZE / pt_per_row)
    axis.set_ticks([centres[i] for i in keep], [texts[i] for i in keep], **kw)


def _declutter(fig: Figure, axes_list, which: str = "y") -> None:
    """Hide tick labels that would still overlap their kept neighbour after layout."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in axes_list:
        axis = ax.yaxis if which == "y" else ax.xaxis
        labels = [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
        boxes = [t.get_window_extent(renderer) for t in labels]
        order = np.argsort([(b.y0 if which == "y" else b.x0) for b in boxes], kind="stable")
        last = None
        for i in order:
            if last is not None and boxes[i].overlaps(boxes[last]):
                labels[i].set_visible(False)
            else:
                last = i


def _x_rotation(
    texts: Sequence[str], centres: Sequence[float], side_in: float, n_rows: int
) -> dict:
    """Horizontal x tick labels when they fit between their neighbours, else vertical ones."""
    if len(centres) < 2:
        return {}
    gap_pt = (
        float(np.min(np.diff(np.asarray(centres, dtype=float)))) * side_in * 72.0 / max(n_rows, 1)
    )
    widest_pt = max(len(t) for t in texts) * TICK_SIZE * 0.62
    return {} if widest_pt + 4 < gap_pt else {"rotation": 90}


def _side_colorbar(fig: Figure, ax, mappable, offset: float = 0.0):
    """A colorbar exactly as tall as ``ax`` (an inset to its right; ``offset`` inches further
    out)."""
    w_in = ax.get_position().width * fig.get_figwidth()
    pad = (0.12 + offset) / max(w_in, 1e-6)
    cax = ax.inset_axes([1.0 + pad, 0.0, 0.16 / max(w_in, 1e-6), 1.0])
    return fig.colorbar(mappable, cax=cax)


def _luminance(rgb) -> float:
    r, g, b = to_rgb(rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _layer_ticks(ax_axis, layers: Sequence[int], max_ticks: int = 16) -> None:
    """Integer layer ticks on an index axis (column k shows layer ``layers[k]``)."""
    n = len(layers)
    step = max(1, math.ceil(n / max_ticks))
    idx = list(range(0, n, step))
    ax_axis.set_ticks(idx, [str(layers[i]) for i in idx])


def _legend_cols(n: int, per_col: int = 14) -> int:
    return max(1, math.ceil(n / per_col))


def _check_stack(stack_X, layers, labels):
    X = getattr(stack_X, "X", stack_X)
    if layers is None:
        layers = getattr(stack_X, "layers", None)
    if labels is None:
        labels = getattr(stack_X, "labels", None)
    X = np.asarray(X)
    if X.ndim != 3:
        raise ValueError(f"stack_X must be [n_layers, n_prompts, d_model], got shape {X.shape}")
    if layers is None:
        layers = list(range(X.shape[0]))
    layers = [int(L) for L in layers]
    if len(layers) != X.shape[0]:
        raise ValueError(f"{len(layers)} layers given for {X.shape[0]} stacked arrays")
    if labels is None or len(labels) != X.shape[1]:
        raise ValueError(f"labels must have one entry per prompt ({X.shape[1]})")
    return X, layers, list(labels)


# ------------------------------------------------------------------------------------------
# pure computations (tested directly)
# ------------------------------------------------------------------------------------------


def centered_cosine(X) -> np.ndarray:
    """Cosine similarity of the rows of ``X`` after subtracting the mean row (centroid).

    A row that is exactly the centroid has no direction; its similarities (including with
    itself) are 0 rather than NaN.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be [n, d], got shape {X.shape}")
    Xc = X - X.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(Xc, axis=1, keepdims=True)
    U = np.divide(Xc, norms, out=np.zeros_like(Xc), where=norms > 0)
    return np.clip(U @ U.T, -1.0, 1.0)


def label_mean_cosine(X, labels) -> tuple[np.ndarray, list]:
    """Cosine similarity between per-label mean vectors of the centred ``X``; ``(matrix, classes)``.

    With two balanced classes the centred means are exact opposites (cosine -1) by construction.
    """
    X = np.asarray(X, dtype=np.float64)
    classes, codes = _classes(labels)
    Xc = X - X.mean(axis=0, keepdims=True)
    M = np.stack([Xc[codes == k].mean(axis=0) for k in range(len(classes))])
    norms = np.linalg.norm(M, axis=1, keepdims=True)
    U = np.divide(M, norms, out=np.zeros_like(M), where=norms > 0)
    return np.clip(U @ U.T, -1.0, 1.0), classes


def pca_2d(X, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Project ``X`` on its first two principal components: ``(coords [n, 2],
    explained_variance_ratio [2])``."""
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float64)
    k = min(2, X.shape[0], X.shape[1])
    pca = PCA(n_components=k, random_state=seed)
    Y = pca.fit_transform(X)
    ratio = pca.explained_variance_ratio_
    if k < 2:
        Y = np.column_stack([Y, np.zeros((Y.shape[0], 2 - k))])
        ratio = np.concatenate([ratio, np.zeros(2 - k)])
    return Y, ratio


def tsne_perplexity(n: int) -> float:
    """``min(30, (n - 1) / 3)`` (kept >= 1 and < n as sklearn requires)."""
    return float(max(1.0, min(30.0, (n - 1) / 3.0, n - 1 - 1e-6)))


def tsne_2d(X, seed: int = 0, pca_dims: int = 50) -> np.ndarray:
    """Seeded 2-D t-SNE of ``X`` (PCA-initialised; inputs first reduced to ``pca_dims`` by PCA)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {n}")
    if pca_dims and X.shape[1] > pca_dims and n > pca_dims:
        X = PCA(n_components=pca_dims, random_state=seed).fit_transform(X)
    tsne = TSNE(
        n_components=2,
        perplexity=tsne_perplexity(n),
        init="pca",
        learning_rate="auto",
        random_state=seed,
    )
    # Small problems run faster on one thread than on many contended ones.
    ctx = threadpool_limits(limits=1) if n <= 500 else contextlib.nullcontext()
    with ctx:
        return tsne.fit_transform(X)


# ------------------------------------------------------------------------------------------
# 1. metric vs layer
# ------------------------------------------------------------------------------------------


def _filter_summary(summary: pd.DataFrame, metric: str, model=None, dataset=None) -> pd.DataFrame:
    df = summary
    if "metric" in df.columns:
        df = df[df["metric"] == metric]
    if model is not None and "model" in df.columns:
        df = df[df["model"] == model]
    if dataset is not None and "dataset" in df.columns:
        df = df[df["dataset"] == dataset]
    if df.empty:
        raise ValueError(f"no rows for metric={metric!r}, model={model!r}, dataset={dataset!r}")
    return df


def _constant_or_none(values) -> float | None:
    v = pd.to_numeric(pd.Series(values), errors="coerce").dropna().to_numpy(dtype=float)
    if v.size == 0:
        return None
    return float(v[0]) if np.allclose(v, v[0]) else float(np.median(v))


def _draw_metric_vs_layer(
    summary: pd.DataFrame,
    *,
    metric: str = "auroc",
    model=None,
    dataset=None,
    n_layers: int | None = None,
    title: str | None = None,
) -> Figure:
    """One curve per (component, pooling) with its interval band and best layer starred, the
    chance and majority-baseline lines, and a legend below the axes."""
    if "probe" in summary.columns:  # the curves are the logistic probe's
        summary = summary[summary["probe"] == "logistic"]
    df = _filter_summary(summary, metric, model, dataset)
    keys = [k for k in ("component", "pooling") if k in df.columns]
    groups = list(df.groupby(keys, sort=True)) if keys else [((), df)]
    passing = _passing_layers(summary, keys)
    with style():
        fig = new_figure(6.4 if len(groups) <= 4 else 7.8, 4.2)
        ax = fig.add_subplot()
        colors = palette(len(groups))
        handles, all_y = [], []
        for i, (key, g) in enumerate(groups):
            key = key if isinstance(key, tuple) else (key,)
            name = " / ".join(str(k) for k in key) if keys else metric_name(metric)
            g = g.sort_values("layer")
            handles.append(_probe_curve(ax, g, name, colors[i], MARKERS[i % len(MARKERS)], all_y))
            _mark_passing(ax, g, passing.get(key, set()), colors[i])
        handles += _chance_lines(ax, df, all_y)
        handles += _curve_legend_keys()
        if "passes_checks" in summary.columns:
            handles.append(_passing_key())
        ax.set_xlabel("layer")
        ax.set_ylabel(metric_axis_label(metric, _n_classes(df)))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _metric_limits(ax, all_y, metric, df["layer"].to_numpy(dtype=float))
        if n_layers:
            sec = ax.secondary_xaxis(
                "top", functions=(lambda L: L / float(n_layers), lambda r: r * float(n_layers))
            )
            sec.set_xlabel(f"relative depth (layer / {n_layers})")
        # Outside the axes: a legend inside covered the intervals, which span most of the plot.
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncols=min(3, len(handles)),
            fontsize="small",
        )
        ax.set_title(
            title
            or _title(f"Linear probe {metric_name(metric)} by layer", model=model, dataset=dataset)
        )
    return fig


def _passing_layers(summary: pd.DataFrame, keys: list[str]) -> dict[tuple, set[int]]:
    """(component, pooling) -> layers whose primary row passes every validity check (logistic)."""
    if "passes_checks" not in summary.columns or "primary" not in summary.columns:
        return {}
    rows = summary[summary["primary"].astype(bool) & (summary["passes_checks"] == True)]  # noqa: E712
    if "probe" in rows.columns:
        rows = rows[rows["probe"] == "logistic"]
    out: dict[tuple, set[int]] = {}
    for _, r in rows.iterrows():
        out.setdefault(tuple(r[k] for k in keys), set()).add(int(r["layer"]))
    return out


def _mark_passing(ax, g: pd.DataFrame, layers: set[int], color) -> None:
    """A ring around each point of a layer that passes every check."""
    sel = g[g["layer"].astype(int).isin(layers)]
    if sel.empty:
        return
    ax.plot(
        sel["layer"].to_numpy(dtype=float),
        pd.to_numeric(sel["mean"], errors="coerce").to_numpy(dtype=float),
        marker="o",
        markersize=11,
        markerfacecolor="none",
        markeredgecolor=color,
        markeredgewidth=1.4,
        linestyle="none",
        zorder=5,
    )


def _passing_key() -> Line2D:
    return Line2D(
        [],
        [],
        marker="o",
        markersize=9,
        markerfacecolor="none",
        markeredgecolor="#555555",
        linestyle="none",
        label="passes every check (interval, selectivity, Holm p, random band)",
    )


def _probe_curve(ax, g: pd.DataFrame, name: str, color, marker: str, all_y: list) -> Line2D:
    """Draw one probe curve (interval band, line, star at its best layer); return its legend key.
    The plotted y values are appended to ``all_y`` (for the axis limits)."""
    x = g["layer"].to_numpy(dtype=float)
    y = pd.to_numeric(g["mean"], errors="coerce").to_numpy(dtype=float)
    if {"ci_low", "ci_high"} <= set(g.columns):
        lo = pd.to_numeric(g["ci_low"], errors="coerce").to_numpy(dtype=float)
        hi = pd.to_numeric(g["ci_high"], errors="coerce").to_numpy(dtype=float)
        ok = np.isfinite(lo) & np.isfinite(hi)
        if ok.any():
            ax.fill_between(
                x,
                np.where(ok, lo, np.nan),
                np.where(ok, hi, np.nan),
                color=color,
                alpha=0.18,
                linewidth=0,
            )
            all_y += [lo[ok], hi[ok]]
    ax.plot(x, y, color=color, marker=marker, markersize=4, zorder=3)
    all_y.append(y[np.isfinite(y)])
    if np.isfinite(y).any():
        b = int(np.nanargmax(y))
        ax.plot(
            [x[b]],
            [y[b]],
            marker="*",
            markersize=13,
            color=color,
            markeredgecolor="black",
            markeredgewidth=0.7,
            linestyle="none",
            zorder=4,
        )
        name += f"  (best: layer {int(x[b])}, {y[b]:.3f})"
    return Line2D([], [], color=color, marker=marker, markersize=4, label=shorten(name, 60))


def _reference_line(
    ax, value: float, linestyle: str, label: str, zorder: float | None = 2
) -> Line2D:
    """A horizontal reference line (chance, majority baseline) and its legend key."""
    ax.axhline(value, color="#555555", linestyle=linestyle, linewidth=1.0, zorder=zorder)
    return Line2D([], [], color="#555555", linestyle=linestyle, linewidth=1.0, label=label)


def _chance_lines(ax, df: pd.DataFrame, all_y: list) -> list:
    """The chance line, and the majority baseline where it differs from chance."""
    chance_col = (
        "chance" if "chance" in df.columns else ("baseline" if "baseline" in df.columns else None)
    )
    chance = _constant_or_none(df[chance_col]) if chance_col else None
    if chance is None:
        return []
    handles = [_reference_line(ax, chance, "--", f"chance ({chance:.2f})")]
    all_y.append(np.array([chance]))
    if chance_col == "chance" and "baseline" in df.columns:
        base = _constant_or_none(df["baseline"])
        if base is not None and abs(base - chance) > 1e-9:
            handles.append(_reference_line(ax, base, ":", f"majority baseline ({base:.2f})"))
            all_y.append(np.array([base]))
    return handles


def _curve_legend_keys() -> list:
    """Legend keys for the interval band and the best-layer star."""
    return [
        Patch(facecolor="#888888", alpha=0.3, label="95% CI"),
        Line2D(
            [],
            [],
            marker="*",
            color="#888888",
            markeredgecolor="black",
            markersize=11,
            linestyle="none",
            label="best layer",
        ),
    ]


def _metric_limits(ax, all_y: list, metric: str, layers: np.ndarray) -> None:
    """y limits padded around every plotted value (clipped to [0, 1] for bounded metrics); x limits
    half a layer beyond the first and last layer."""
    ys = np.concatenate(all_y) if all_y else np.array([0.0, 1.0])
    lo, hi = float(np.nanmin(ys)), float(np.nanmax(ys))
    pad = max(0.02, 0.06 * (hi - lo))
    if metric in _BOUNDED:
        ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad) + (0.01 if hi + pad >= 1 else 0))
    else:
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlim(layers.min() - 0.5, layers.max() + 0.5)


def metric_vs_layer(
    summary: pd.DataFrame,
    out,
    *,
    metric: str = "auroc",
    model=None,
    dataset=None,
    n_layers: int | None = None,
    title: str | None = None,
    formats: Sequence[str] = ("png",),
    dpi: float = DEFAULT_DPI,
) -> list[str]:
    """Probe ``metric`` against layer, one line per (component, pooling) with its 95% interval.

    ``summary``: rows as :func:`layerscope.analysis.probes.summary_rows` makes them (columns
    ``layer,
    metric, mean, ci_low, ci_high`` and optionally ``model, dataset, component, pooling,
    chance, baseline``); it is filtered to ``metric`` (and ``model``/``dataset`` when given).
    The chance level (``chance``, else ``baseline``) is dashed; a majority baseline that differs
    from it is dotted. Each line's best layer (highest mean; ties: the shallowest) is starred
    and named in the legend. ``n_layers`` adds a top axis with relative depth ``layer / n_layers``.
    """
    fig = _draw_metric_vs_layer(
        summary, metric=metric, model=model, dataset=dataset, n_layers=n_layers, title=title
    )
    return _finish(fig, out, formats, dpi)


# ------------------------------------------------------------------------------------------
# 2. PCA / t-SNE grids
# ------------------------------------------------------------------------------------------


def _pick_panels(n_layers: int, max_panels: int | None) -> list[int]:
    if not max_panels or n_layers <= max_panels:
        return list(range(n_layers))
    return sorted(set(np.round(np.linspace(0, n_layers - 1, max_panels)).astype(int).tolist()))


def _draw_embedding_grid(
    stack_X,
    layers,
    labels,
    *,
    method: str,
    model=None,
    dataset=None,
    component=None,
    pooling=None,
    max_panels: int | None = 16,
    seed: int = 0,
    title: str | None = None,
) -> Figure:
    X, layers, labels = _check_stack(stack_X, layers, labels)
    classes, codes = _classes(labels)
    colors = palette(len(classes))
    idx = _pick_panels(len(layers), max_panels)
    n_pan = len(idx)
    ncols = min(n_pan, 4 if n_pan <= 16 else 6)
    nrows = math.ceil(n_pan / ncols)
    n = X.shape[1]
    size = float(np.clip(1800.0 / max(n, 1), 3.0, 28.0))
    order = np.random.default_rng(seed).permutation(n)  # no class is systematically drawn on top
    point_colors = np.array([to_rgb(colors[c]) for c in codes])
    legend_w = 1.3 + 0.9 * (_legend_cols(len(classes)) - 1)
    with style():
        fig = new_figure(2.7 * ncols + legend_w, 2.55 * nrows + 0.9)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for j, ax in enumerate(axes.flat):
            if j >= n_pan:
                ax.set_visible(False)
                continue
            k = idx[j]
            if method == "pca":
                Y, ratio = pca_2d(X[k], seed=seed)
                ax.set_xlabel(f"PC1 ({100 * ratio[0]:.1f}% var)")
                ax.set_ylabel(f"PC2 ({100 * ratio[1]:.1f}% var)")
            else:
                Y = tsne_2d(X[k], seed=seed)
                ax.set_xlabel("t-SNE 1")
                ax.set_ylabel("t-SNE 2")
                ax.set_xticks([])
                ax.set_yticks([])
            ax.scatter(
                Y[order, 0],
                Y[order, 1],
                s=size,
                c=point_colors[order],
                alpha=0.8,
                linewidths=0,
                rasterized=n > 2000,
            )
            ax.set_title(f"layer {layers[k]}")
            ax.tick_params(labelsize=TICK_SIZE - 1)
        handles = [
            Line2D(
                [],
                [],
                marker="o",
                linestyle="none",
                color=colors[c],
                markersize=6,
                label=f"{shorten(cls)} (n={int(np.sum(codes == c))})",
            )
            for c, cls in enumerate(classes)
        ]
        fig.legend(
            handles=handles,
            loc="outside right upper",
            title="label",
            ncols=_legend_cols(len(classes)),
        )
        what = (
            "PCA"
            if method == "pca"
            else f"t-SNE (perplexity {tsne_perplexity(n):.0f}, seed {seed})"
        )
        extra = None
        if n_pan < len(layers):
            extra = f"{n_pan} of {len(layers)} layers shown, evenly spaced"
        _suptitle(
            fig,
            title
            or _title(
                f"{what} of pooled activations per layer",
                model=model,
                dataset=dataset,
                component=component,
                pooling=pooling,
                extra=extra,
            ),
        )
    return fig


def _draw_pca_grid(stack_X, layers, labels, **kw) -> Figure:
    return _draw_embedding_grid(stack_X, layers, labels, method="pca", **kw)


def _draw_tsne_grid(stack_X, layers, labels, **kw) -> Figure:
    return _draw_embedding_grid(stack_X, layers, labels, method="tsne", **kw)


def pca_grid(
    stack_X,
    layers,
    labels,
    out,
    *,
    model=None,
    dataset=None,
    component=None,
    pooling=None,
    max_panels: int | None = 16,
    seed: int = 0,
    title: str | None = None,
    formats: Sequence[str] = ("png",),
    dpi: float = DEFAULT_DPI,
) -> list[str]:
    """One panel per layer: prompts on their layer's first two principal components, coloured by
    label.

    ``stack_X``: ``[n_layers, n_prompts, d_model]`` (or a LayerStack; then ``layers``/``labels`` may
    be None). Axis labels give each component's explained-variance share. With more than
    ``max_panels`` layers, ``max_panels`` evenly spaced ones (first and last included) are shown
    and the title says so; ``max_panels=None`` shows all.
    """
    fig = _draw_pca_grid(
        stack_X,
        layers,
        labels,
        model=model,
        dataset=dataset,
        component=component,
        pooling=pooling,
        max_panels=max_panels,
        seed=seed,
        title=title,
    )
    return _finish(fig, out, formats, dpi)


def tsne_grid(
    stack_X,
    layers,
    labels,
    out,
    *,
    model=None,
    dataset=None,
    component=None,
    pooling=None,
    max_panels: int | None = 16,
    seed: int = 0,
    title: str | None = None,
    formats: Sequence[str] = ("png",),
    dpi: float = DEFAULT_DPI,
) -> list[str]:
    """As :func:`pca_grid` with a seeded t-SNE per layer (perplexity ``min(30, (n-1)/3)``, PCA init,
    inputs reduced to 50 dimensions by PCA first). t-SNE distances between clusters are not
    meaningful, so the axes carry no ticks."""
    fig = _draw_tsne_grid(
        stack_X,
        layers,
        labels,
        model=model,
        dataset=dataset,
        component=component,
        pooling=pooling,
        max_panels=max_panels,
        seed=seed,
        title=title,
    )
    return _finish(fig, out, formats, dpi)


# ------------------------------------------------------------------------------------------
# 3. cosine heatmaps
# ------------------------------------------------------------------------------------------


def _draw_cosine_heatmap(
    X,
    labels,
    *,
    prompt_ids=None,
    model=None,
    dataset=None,
    layer=None,
    component=None,
    pooling=None,
    title: str | None = None,
) -> Figure:
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] != len(labels):
        raise ValueError(
            f"X must be [n, d] with one label per row; got {X.shape} and {len(labels)} labels"
        )
    classes, codes = _classes(labels)
    order = np.argsort(codes, kind="stable")
    S = centered_cosine(X)[np.ix_(order, order)]
    n = len(order)
    blocks = _blocks(codes[order])
    centres = [(a + b - 1) / 2.0 for _, a, b in blocks]
    names = [shorten(classes[c]) for c, _, _ in blocks]
    show_ids = prompt_ids is not None and n <= _MAX_PROMPT_TICKS
    row_centres = list(range(n)) if show_ids else centres
    side = _row_side(n, row_centres)
    longest = max(len(s) for s in names)
    margin = 0.3 + longest * TICK_SIZE * 0.6 / 72.0
    id_margin = 0.0
    if show_ids:
        ids = [shorten(p, 28) for p in np.asarray(prompt_ids)[order]]
        id_margin = 0.2 + max(len(s) for s in ids) * (TICK_SIZE - 1) * 0.6 / 72.0
    with style(), rc_context({"axes.grid": False}):
        xrot = _x_rotation(names, centres, side, n)
        fig = new_figure(side + margin + id_margin + 1.3, side + (margin if xrot else 0.3) + 1.1)
        ax = fig.add_subplot()
        im = ax.imshow(
            S,
            cmap="RdBu_r",
            norm=TwoSlopeNorm(0.0, -1.0, 1.0),
            interpolation="nearest" if n <= 600 else "antialiased",
            aspect="equal",
        )
        smallest_block_pt = min(b - a for _, a, b in blocks) * side * 72.0 / n
        lw = float(np.clip(0.12 * smallest_block_pt, 0.25, 0.8))
        for _, a, _ in blocks[1:]:
            ax.axhline(a - 0.5, color="black", linewidth=lw)
            ax.axvline(a - 0.5, color="black", linewidth=lw)
        _set_row_ticks(ax.yaxis, centres, names, side, n)
        _set_row_ticks(ax.xaxis, centres, names, side, n, **xrot)
        ax.tick_params(length=0)
        if show_ids:
            sec = ax.secondary_yaxis("right")
            _set_row_ticks(sec.yaxis, list(range(n)), ids, side, n, fontsize=TICK_SIZE - 1)
            sec.tick_params(length=0)
            sec.set_ylabel("prompt")
        ax.set_ylabel("label")
        ax.set_xlabel("label")
        cb = _side_colorbar(fig, ax, im, offset=id_margin)
        cb.set_label("cosine similarity (centred)")
        cb.set_ticks([-1, -0.5, 0, 0.5, 1])
        _suptitle(
            fig,
            title
            or _title(
                "Cosine similarity of centroid-subtracted activations",
                model=model,
                dataset=dataset,
                layer=layer,
                component=component,
                pooling=pooling,
            ),
        )
        _declutter(fig, [ax] + ([sec] if show_ids else []), "y")
        _declutter(fig, [ax], "x")
    return fig


def cosine_heatmap(
    X,
    labels,
    out,
    *,
    prompt_ids=None,
    model=None,
    dataset=None,
    layer=None,
    component=None,
    pooling=None,
    title: str | None = None,
    formats: Sequence[str] = ("png",),
    dpi: float = DEFAULT_DPI,
) -> list[str]:
    """Prompt x prompt cosine similarity after subtracting the centroid (:func:`centered_cosine`).

    Prompts are ordered by label (stable: prompt order kept within a label); label blocks are
    separated by lines and named on both axes. Colours: diverging, centred at 0, fixed to [-1, 1].
    With ``prompt_ids`` and at most 60 prompts, the ids are written along the right edge.
    """
    fig = _draw_cosine_heatmap(
        X,
        labels,
        prompt_ids=prompt_ids,
        model=model,
        dataset=dataset,
        layer=layer,
        component=component,
        pooling=pooling,
        title=title,
    )
    return _finish(fig, out, formats, dpi)


def _annotate(
    ax, M: np.ndarray, cmap, norm, fmt: str = "{:.2f}", fontsize: float | None = None
) -> None:
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            v = M[i, j]
            if not np.isfinite(v):
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=fontsize, color="#444444")
                continue
            dark = _luminance(cmap(norm(v))) < 0.45
            ax.text(
                j,
                i,
                fmt.format(v),
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if dark else "black",
            )


def _draw_label_mean_matrix(
    X,
    labels,
    *,
    model=None,
    dataset=None,
    layer=None,
    component=None,
    pooling=None,
    title: str | None = None,
) -> Figure:
    M, classes = label_mean_cosine(X, labels)
    k = len(classes)
    _, codes = _classes(labels)
    names = [f"{shorten(c)} (n={int(np.sum(codes == i))})" for i, c in enumerate(classes)]
    cell = (
        max(0.45, _ROW_PITCH * TICK_SIZE / 72.0)
        if k <= 12
        else _ROW_PITCH * TICK_SIZE / 72.0 * 1.15
    )
    side = float(min(_HEATMAP_MAX_SIDE, max(2.4, k * cell)))
    xnames = [shorten(c) for c in classes]
    margin_y = 0.3 + max(len(s) for s in names) * TICK_SIZE * 0.6 / 72.0
    margin_x = 0.3 + max(len(s) for s in xnames) * TICK_SIZE * 0.6 / 72.0
    annotate = k <= 30
    with style(), rc_context({"axes.grid": False}):
        xrot = _x_rotation(xnames, list(range(k)), side, k)
        fig = new_figure(side + margin_y + 1.4, side + (margin_x if xrot else 0.3) + 1.2)
        ax = fig.add_subplot()
        cmap, norm = colormaps["RdBu_r"], TwoSlopeNorm(0.0, -1.0, 1.0)
        im = ax.imshow(M, cmap=cmap, norm=norm, aspect="equal")
        _set_row_ticks(ax.yaxis, list(range(k)), names, side, k)
        _set_row_ticks(ax.xaxis, list(range(k)), xnames, side, k, **xrot)
        ax.tick_params(length=0)
        if annotate:
            fs = float(np.clip(side * 72.0 / k * 0.32, 5.0, TICK_SIZE))
            _annotate(ax, M, cmap, norm, fontsize=fs)
        cb = _side_colorbar(fig, ax, im)
        cb.set_label("cosine similarity of label means")
        cb.set_ticks([-1, -0.5, 0, 0.5, 1])
        _suptitle(
            fig,
            title
            or _title(
                "Cosine similarity between label means (centred)",
                model=model,
                dataset=dataset,
                layer=layer,
                component=component,
                pooling=pooling,
            ),
        )
        _declutter(fig, [ax], "y")
        _declutter(fig, [ax], "x")
    return fig


def mean_difference_projection(
    X, labels, n_folds: int = 5, seed: int = 0
) -> tuple[np.ndarray, list]:
    """Each prompt's projection on the unit difference of the two class means, cross-fitted: the
    direction is computed without the prompt's fold, so random labels do not separate (with
    d >> n an in-sample direction separates any labelling). Returns ``(projections, classes)``."""
    X = np.asarray(X, dtype=np.float64)
    classes, codes = _classes(labels)
    if len(classes) != 2:
        raise ValueError(f"mean_difference_projection needs two classes, got {len(classes)}")
    folds = np.random.default_rng(seed).permutation(len(codes)) % max(2, min(n_folds, len(codes)))
    proj = np.zeros(len(codes))
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        diff = X[tr][codes[tr] == 1].mean(axis=0) - X[tr][codes[tr] == 0].mean(axis=0)
        unit = diff / (np.linalg.norm(diff) or 1.0)
        proj[te] = (X[te] - X[tr].mean(axis=0)) @ unit
    return proj, classes


def _draw_mean_difference(
    X,
    labels,
    *,
    model=None,
    dataset=None,
    layer=None,
    component=None,
    pooling=None,
    title: str | None = None,
) -> Figure:
    proj, classes = mean_difference_projection(X, labels)
    _, codes = _classes(labels)
    a, b = proj[codes == 0], proj[codes == 1]
    pooled = (
        math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2) if min(a.size, b.size) > 1 else float("nan")
    )
    d_prime = (b.mean() - a.mean()) / pooled if pooled and np.isfinite(pooled) else float("nan")
    with style():
        fig = new_figure(6.4, 3.8)
        ax = fig.add_subplot()
        bins = np.histogram_bin_edges(proj, bins=min(30, max(8, proj.size // 3)))
        for vals, name, color in ((a, classes[0], palette(2)[0]), (b, classes[1], palette(2)[1])):
            ax.hist(
                vals, bins=bins, alpha=0.55, color=color, label=f"{shorten(name)} (n={vals.size})"
            )
        ax.set_xlabel(
            "projection on the difference of class means "
            f"({shorten(classes[1])} − {shorten(classes[0])}),"
            " cross-fitted over 5 folds"
        )
        ax.set_ylabel("prompts")
        ax.legend(loc="upper left", fontsize="small")
        _suptitle(
            fig,
            title
            or _title(
                f"Two label means: separation along their difference (d′ = {d_prime:.2f})",
                model=model,
                dataset=dataset,
                layer=layer,
                component=component,
                pooling=pooling,
            ),
        )
    return fig


def label_mean_matrix(
    X,
    labels,
    out,
    *,
    model=None,
    dataset=None,
    layer=None,
    component=None,
    pooling=None,
    title: str | None = None,
    formats: Sequence[str] = ("png",),
    dpi: float = DEFAULT_DPI,
) -> list[str]:
    """Annotated matrix of cosine similarities between the per-label mean vectors, after
    subtracting the overall centroid (:func:`label_mean_cosine`). Axis labels give each
    label's prompt count. Values are written in the cells for up to 30 labels.

    With two labels that matrix is always [[1, -1], [-1, 1]] (centring makes the two means
    opposite), so the figure shows instead how far the prompts separate along the difference of the
    two means (cross-fitted projections by class, with d′)."""
    draw = _draw_mean_difference if len(set(map(str, labels))) == 2 else _draw_label_mean_matrix
    fig = draw(
        X,
        labels,
        model=model,
        dataset=dataset,
        layer=layer,
        component=component,
        pooling=pooling,
        title=title,
    )
    return _finish(fig, out, formats, dpi)


# ------------------------------------------------------------------------------------------
# 4. norms
# ------------------------------------------------------------------------------------------


def _check_norms(norms, layers, labels) -> tuple[np.ndarray, list[int]]:
    N = np.asarray(norms, dtype=np.float64)
    if N.ndim != 2:
        raise ValueError(f"norms must be [n_prompts, n_layers], got shape {N.shape}")
    if layers is None:
        layers = list(range(N.shape[1]))
    layers = [int(L) for L in layers]
    if len(layers) != N.shape[1]:
        raise ValueError(f"{len(layers)} layers given for {N.shape[1]} norm columns")
    if len(labels) != N.shape[0]:
        raise ValueError(f"{len(labels)} labels given for {N.shape[0]} prompts")
    return N, layers


def _draw_norm_heatmap(
    norms,
    layers,
    labels,
    *,
    prompt_ids=None,
    model=None,
    dataset=None,
    component=None,
    pooling=None,
    log: bool = False,
    title: str | None = None,
) -> Figure:
    N, layers = _check_norms(norms, layers, labels)
    classes, codes = _classes(labels)
    order = np.argsort(codes, kind="stable")
    n = len(order)
    blocks = _blocks(codes[order])
    centres = [(a + b - 1) / 2.0 for _, a, b in blocks]
    names = [shorten(classes[c]) for c, _, _ in blocks]
    show_ids = prompt_ids is not None and n <= _MAX_PROMPT_TICKS
    height = _row_side(n, list(range(n)) if show_ids else centres)
    width = float(np.clip(0.22 * len(layers), 3.5, 10.0))
    margin = 0.3 + max(len(s) for s in names) * TICK_SIZE * 0.6 / 72.0
    id_margin = 0.0
    if show_ids:
        ids = [shorten(p, 28) for p in np.asarray(prompt_ids)[order]]
        id_margin = 0.2 + max(len(s) for s in ids) * (TICK_SIZE - 1) * 0.6 / 72.0
    colors = palette(len(classes))
    with style(), rc_context({"axes.grid": False}):
        fig = new_figure(width + margin + id_margin + 1.6, height + 1.5)
        gs = fig.add_gridspec(1, 2, width_ratios=[0.25, width], wspace=0.01)
        band = fig.add_subplot(gs[0, 0])
        ax = fig.add_subplot(gs[0, 1], sharey=band)
        M = N[order]
        vals = M[np.isfinite(M)]
        if log:
            pos = vals[vals > 0]
            norm = LogNorm(pos.min(), pos.max()) if pos.size else None
        else:
            norm = Normalize(vals.min(), vals.max()) if vals.size else None
        im = ax.imshow(
            M,
            cmap="viridis",
            norm=norm,
            aspect="auto",
            interpolation="nearest" if n <= 600 else "antialiased",
        )
        band.imshow(
            codes[order][:, None],
            cmap=ListedColormap(colors),
            vmin=-0.5,
            vmax=len(classes) - 0.5,
            aspect="auto",
            interpolation="nearest",
        )
        for _, a, _ in blocks[1:]:
            ax.axhline(a - 0.5, color="white", linewidth=1.0)
            band.axhline(a - 0.5, color="white", linewidth=1.0)
        band.set_xticks([])
        _set_row_ticks(band.yaxis, centres, names, height, n)
        band.tick_params(axis="y", length=0)
        band.set_ylabel("label")
        for s in band.spines.values():
            s.set_visible(False)
        ax.tick_params(axis="y", left=False, labelleft=False)
        _layer_ticks(ax.xaxis, layers)
        ax.set_xlabel("layer")
        if show_ids:
            sec = ax.secondary_yaxis("right")
            _set_row_ticks(sec.yaxis, list(range(n)), ids, height, n, fontsize=TICK_SIZE - 1)
            sec.tick_params(length=0)
        cb = fig.colorbar(im, ax=ax, pad=0.02, shrink=1.0 if height < 6 else 0.6)
        cb.set_label("L2 norm" + (" (log scale)" if log else ""))
        _suptitle(
            fig,
            title
            or _title(
                "L2 norm of pooled activations (rows: prompts, grouped by label)",
                model=model,
                dataset=dataset,
                component=component,
                pooling=pooling,
            ),
        )
        _declutter(fig, [band] + ([sec] if show_ids else []), "y")
    return fig


def norm_heatmap(
    norms,
    layers,
    labels,
    out,
    *,
    prompt_ids=None,
    model=None,
    dataset=None,
    component=None,
    pooling=None,
    log: bool = False,
    title: str | None = None,
    formats: Sequence[str] = ("png",),
    dpi: float = DEFAULT_DPI,
) -> list[str]:
    """Prompts (rows, grouped by label in stable order, a coloured label band on the left) x
    layers (columns), coloured by the L2 norm of the pooled vector
    (:func:`layerscope.analysis.stats.prompt_norms`).
    ``log=True`` uses a logarithmic colour scale (norms often grow geometrically with depth)."""
    fig = _draw_norm_heatmap(
        norms,
        layers,
        labels,
        prompt_ids=prompt_ids,
        model=model,
        dataset=dataset,
        component=component,
        pooling=pooling,
        log=log,
        title=title,
    )
    return _finish(fig, out, formats, dpi)


def _draw_norm_curves(
    norms,
    layers,
    labels,
    *,
    spread: str = "std",
    model=None,
    dataset=None,
    component=None,
    pooling=None,
    log: bool = False,
    title: str | None = None,
) -> Figure:
    if spread not in ("std", "iqr"):
        raise ValueError(f"spread must be 'std' or 'iqr', got {spread!r}")
    N, layers = _check_norms(norms, layers, labels)
    classes, codes = _classes(labels)
    colors = palette(len(classes))
    x = np.asarray(layers, dtype=float)
    with style():
        fig = new_figure(6.4 if len(classes) <= 8 else 7.8, 4.2)
        ax = fig.add_subplot()
        handles = []
        for k, cls in enumerate(classes):
            G = N[codes == k]
            if spread == "std":
                centre = G.mean(axis=0)
                sd = G.std(axis=0, ddof=1) if G.shape[0] > 1 else np.zeros(G.shape[1])
                lo, hi = centre - sd, centre + sd
            else:
                centre = np.median(G, axis=0)
                lo, hi = np.percentile(G, 25, axis=0), np.percentile(G, 75, axis=0)
            color, marker = colors[k], MARKERS[k % len(MARKERS)]
            ax.fill_between(x, lo, hi, color=color, alpha=0.18, linewidth=0)
            ax.plot(x, centre, color=color, marker=marker, markersize=3.5)
            handles.append(
                Line2D(
                    [],
                    [],
                    color=color,
                    marker=marker,
                    markersize=3.5,
                    label=f"{shorten(cls)} (n={G.shape[0]})",
                )
            )
        band = (
            "\u00b11 SD across prompts" if spread == "std" else "interquartile range across prompts"
        )
        centre_name = "mean" if spread == "std" else "median"
        handles.append(Patch(facecolor="#888888", alpha=0.3, label=f"shaded: {band}"))
        ax.set_xlabel("layer")
        ax.set_ylabel(f"{centre_name} L2 norm" + (" (log scale)" if log else ""))
        if log:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(handles) <= 9:
            ax.legend(handles=handles, loc="best", title="label")
        else:
            fig.legend(
                handles=handles,
                loc="outside right upper",
                title="label",
                ncols=_legend_cols(len(handles), 20),
            )
        ax.set_title(
            title
            or _title(
                f"L2 norm of pooled activations by layer ({centre_name} per label)",
                model=model,
                dataset=dataset,
                component=component,
                pooling=pooling,
            )
        )
    return fig


def norm_curves(
    norms,
    layers,
    labels,
    out,
    *,
    spread: str = "std",
    model=None,
    dataset=None,
    component=None,
    pooling=None,
    log: bool = False,
    title: str | None = None,
    formats: Sequence[str] = ("png",),
    dpi: float = DEFAULT_DPI,
) -> list[str]:
    """Per-label norm against layer: ``spread="std"`` draws the mean with a +-1 SD band (sample SD),
    ``spread="iqr"`` the median with the interquartile range; the legend says which."""
    fig = _draw_norm_curves(
        norms,
        layers,
        labels,
        spread=spread,
        model=model,
        dataset=dataset,
        component=component,
        pooling=pooling,
        log=log,
        title=title,
    )
    return _finish(fig, out, formats, dpi)


# ------------------------------------------------------------------------------------------
# 5. cross-dataset generalisation
# ------------------------------------------------------------------------------------------

_CHANCE = {"auroc": 0.5, "balanced_accuracy": None, "accuracy": None, "f1": None}


def _draw_generalization_matrix(
    matrix: pd.DataFrame,
    *,
    metric: str = "auroc",
    layer=None,
    model=None,
    component=None,
    pooling=None,
    chance: float | None = None,
    title: str | None = None,
    intervals=None,
    note: str | None = None,
) -> Figure:
    M = matrix.to_numpy(dtype=float)
    rows = [shorten(r) for r in matrix.index]
    cols = [shorten(c) for c in matrix.columns]
    nr, nc = M.shape
    chance = _CHANCE.get(metric) if chance is None else chance
    cell = 0.62 if max(nr, nc) <= 10 else max(0.3, _ROW_PITCH * TICK_SIZE / 72.0 * 1.2)
    w = float(min(_HEATMAP_MAX_SIDE, max(2.5, nc * cell)))
    h = float(min(_HEATMAP_MAX_SIDE, max(2.0, nr * cell)))
    margin_y = 0.4 + max(len(s) for s in rows) * TICK_SIZE * 0.6 / 72.0
    margin_x = 0.4 + max(len(s) for s in cols) * TICK_SIZE * 0.6 / 72.0
    vals = M[np.isfinite(M)]
    bounded = metric in _BOUNDED
    with style(), rc_context({"axes.grid": False}):
        fig = new_figure(w + margin_y + 1.5, h + margin_x + 1.2)
        ax = fig.add_subplot()
        if chance is not None:
            if bounded and 0.0 < chance < 1.0:
                lo, hi = 0.0, 1.0  # the full metric range: colours comparable across figures
            else:
                span = (
                    max(abs(vals.max() - chance), abs(vals.min() - chance), 1e-6)
                    if vals.size
                    else 1.0
                )
                lo, hi = chance - span, chance + span
            cmap, norm = colormaps["RdBu_r"], TwoSlopeNorm(chance, lo, hi)
        else:
            cmap = colormaps["viridis"]
            norm = Normalize(0.0, 1.0) if bounded else Normalize(vals.min(), vals.max())
        im = ax.imshow(np.ma.masked_invalid(M), cmap=cmap, norm=norm, aspect="equal")
        ax.set_yticks(range(nr), rows)
        ax.set_xticks(
            range(nc),
            cols,
            rotation=45 if max(len(c) for c in cols) > 3 else 0,
            ha="right" if max(len(c) for c in cols) > 3 else "center",
            rotation_mode="anchor",
        )
        ax.tick_params(length=0)
        if max(nr, nc) <= 25 and intervals is None:
            fs = float(np.clip(cell * 72.0 * 0.3, 5.5, TICK_SIZE + 1))
            _annotate(ax, M, cmap, norm, fontsize=fs)
        elif max(nr, nc) <= 10:
            _annotate_intervals(ax, M, *(np.asarray(b, dtype=float) for b in intervals), cmap, norm)
        for i, r in enumerate(matrix.index):
            if r in list(matrix.columns):
                j = list(matrix.columns).index(r)
                ax.add_patch(
                    Rectangle(
                        (j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.4
                    )
                )
        ax.set_ylabel("train dataset")
        ax.set_xlabel("test dataset")
        cb = _side_colorbar(fig, ax, im)
        cb.set_label(
            metric_name(metric) + (f" (white = chance, {chance:g})" if chance is not None else "")
        )
        _suptitle(
            fig,
            title
            or _title(
                f"Cross-dataset generalisation of linear probes ({metric_name(metric)})",
                model=model,
                layer=layer,
                component=component,
                pooling=pooling,
                extra="outlined diagonal: cross-validated within the dataset"
                + (" (the probe summary)" if intervals is not None else "")
                + ("; [95% interval]" if intervals is not None else "")
                + (f"\n{note}" if note else ""),
            ),
        )
        _declutter(fig, [ax], "y")
    return fig


def _annotate_intervals(ax, M: np.ndarray, lo: np.ndarray, hi: np.ndarray, cmap, norm) -> None:
    """Each cell's value with its interval below it (two lines)."""
    for (i, j), v in np.ndenumerate(M):
        if not np.isfinite(v):
            continue
        dark = _luminance(cmap(norm(v))) < 0.45
        band = (
            f"[{lo[i, j]:.2f}, {hi[i, j]:.2f}]"
            if np.isfinite(lo[i, j]) and np.isfinite(hi[i, j])
            else ""
        )
        ax.text(
            j,
            i,
            f"{v:.2f}\n{band}".rstrip(),
            ha="center",
            va="center",
            fontsize=TICK_SIZE - 1,
            color="white" if dark else "black",
        )


def generalization_matrix(
    matrix: pd.DataFrame,
    out,
    *,
    metric: str = "auroc",
    layer=None,
    model=None,
    component=None,
    pooling=None,
    chance: float | None = None,
    title: str | None = None,
    formats: Sequence[str] = ("png",),
    dpi: float = DEFAULT_DPI,
    intervals=None,
    note: str | None = None,
) -> list[str]:
    """Annotated train-dataset (rows) x test-dataset (columns) heatmap, as made by
    :func:`layerscope.analysis.probes.cross_dataset_matrix`. Diagonal cells (cross-validated) are
    outlined.
    With a ``chance`` level (default 0.5 for AUROC) the colours diverge around it; otherwise a
    sequential map over [0, 1]. ``intervals``: (low, high) frames shaped like ``matrix``, written
    under each value; ``note``: a line under the title (e.g. why this layer is shown)."""
    fig = _draw_generalization_matrix(
        matrix,
        metric=metric,
        layer=layer,
        model=model,
        component=component,
        pooling=pooling,
        chance=chance,
        title=title,
        intervals=intervals,
        note=note,
    )
    return _finish(fig, out, formats, dpi)


# ------------------------------------------------------------------------------------------
# 6. best layer vs relative depth across models
# ------------------------------------------------------------------------------------------


def _draw_best_layer_vs_depth(
    df: pd.DataFrame,
    *,
    metric: str = "auroc",
    dataset=None,
    chance: float | None = None,
    title: str | None = None,
) -> Figure:
    """Models on one relative-depth axis: whole curves when several layers per model are given,
    else each model's best layer as a point with its interval."""
    df = _depth_rows(df, metric, dataset)
    models = list(dict.fromkeys(df["model"]))
    colors = palette(len(models))
    has_ci = {"ci_low", "ci_high"} <= set(df.columns)
    if chance is None and "chance" in df.columns:
        chance = _constant_or_none(df["chance"])
    lines_mode = df.groupby("model")["layer"].nunique().max() > 1
    with style():
        fig = new_figure(6.6 if len(models) <= 6 else 8.0, 4.2)
        ax = fig.add_subplot()
        handles = [
            _depth_model(
                ax,
                df[df["model"] == m].sort_values("layer"),
                m,
                colors[i],
                MARKERS[i % len(MARKERS)],
                has_ci,
                lines_mode,
            )
            for i, m in enumerate(models)
        ]
        if chance is not None:
            handles.append(_reference_line(ax, chance, "--", f"chance ({chance:.2f})", zorder=None))
        handles += _depth_legend_keys(has_ci, lines_mode)
        ax.set_xlabel("relative depth (layer / n_layers)")
        label = metric_axis_label(metric, _n_classes(df))  # says how classes are averaged (> 2)
        ax.set_ylabel(label if lines_mode else f"best-layer {label}")
        ax.set_xlim(-0.03, 1.03)
        if len(handles) <= 8:
            ax.legend(handles=handles, loc="best")
        else:
            fig.legend(handles=handles, loc="outside right upper")
        what = (
            f"Linear probe {metric_name(metric)} vs relative depth"
            if lines_mode
            else f"Best-layer probe {metric_name(metric)} by model"
        )
        ax.set_title(title or _title(what, dataset=dataset))
    return fig


def _depth_rows(df: pd.DataFrame, metric: str, dataset) -> pd.DataFrame:
    """The rows of one metric (and dataset) to draw; a clear error when columns or rows are
    missing."""
    need = {"model", "n_layers", "layer", "mean"}
    missing = need - set(df.columns)
    if missing:
        raise ValueError(f"best_layer_vs_depth: missing columns {sorted(missing)}")
    if "metric" in df.columns:
        df = df[df["metric"] == metric]
    if dataset is not None and "dataset" in df.columns:
        df = df[df["dataset"] == dataset]
    if df.empty:
        raise ValueError("best_layer_vs_depth: no rows to plot")
    return df


def _depth_model(
    ax, g: pd.DataFrame, model: str, color, marker: str, has_ci: bool, lines_mode: bool
) -> Line2D:
    """Draw one model (its curve with the best layer starred, or its best layer with an error bar);
    return its legend key."""
    nl = int(g["n_layers"].iloc[0])
    x = relative_depth(g["layer"].to_numpy(dtype=float), nl)
    y = g["mean"].to_numpy(dtype=float)
    b = int(np.nanargmax(y))
    lo = g["ci_low"].to_numpy(dtype=float) if has_ci else None
    hi = g["ci_high"].to_numpy(dtype=float) if has_ci else None
    if lines_mode:
        if has_ci:
            ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)
        ax.plot(x, y, color=color, marker=marker, markersize=3)
        ax.plot(
            [x[b]],
            [y[b]],
            marker="*",
            markersize=13,
            color=color,
            markeredgecolor="black",
            markeredgewidth=0.7,
            linestyle="none",
            zorder=4,
        )
    elif has_ci:
        ax.errorbar(
            [x[b]],
            [y[b]],
            yerr=[[y[b] - lo[b]], [hi[b] - y[b]]],
            color=color,
            capsize=3,
            linewidth=1.2,
            marker=marker,
            markersize=7,
            markeredgecolor="black",
            markeredgewidth=0.6,
            linestyle="none",
            zorder=5,
        )
    else:
        ax.plot(
            [x[b]],
            [y[b]],
            marker=marker,
            markersize=7,
            color=color,
            markeredgecolor="black",
            markeredgewidth=0.6,
            linestyle="none",
        )
    label = f"{shorten(model, 32)} (best: layer {int(g['layer'].iloc[b])}/{nl}, {y[b]:.3f})"
    return Line2D(
        [],
        [],
        color=color,
        marker=marker,
        markersize=5 if lines_mode else 7,
        linestyle="-" if lines_mode else "none",
        label=label,
    )


def _depth_legend_keys(has_ci: bool, lines_mode: bool) -> list:
    """Legend keys for the best-layer star (curves) and the interval (band or error bar)."""
    keys = []
    if lines_mode:
        keys.append(_curve_legend_keys()[1])
    if has_ci:
        if lines_mode:
            keys.append(Patch(facecolor="#888888", alpha=0.3, label="95% CI"))
        else:
            keys.append(
                Line2D(
                    [],
                    [],
                    color="#888888",
                    marker="|",
                    markersize=10,
                    linestyle="none",
                    label="95% CI",
                )
            )
    return keys


def best_layer_vs_depth(
    df: pd.DataFrame,
    out,
    *,
    metric: str = "auroc",
    dataset=None,
    chance: float | None = None,
    title: str | None = None,
    formats: Sequence[str] = ("png",),
    dpi: float = DEFAULT_DPI,
) -> list[str]:
    """Compare models on a relative-depth axis (``layer / n_layers``).

    ``df`` columns: ``model, n_layers, layer, mean`` and optionally ``ci_low, ci_high, metric,
    dataset, chance``. With one row per model: each model's best layer as a marker with its 95%
    interval. With several layers per model: one line per model over all its layers (shaded
    interval), the best layer starred and named in the legend.
    """
    fig = _draw_best_layer_vs_depth(df, metric=metric, dataset=dataset, chance=chance, title=title)
    return _finish(fig, out, formats, dpi)


# ------------------------------------------------------------------------------------------
# steering (interventions)
# ------------------------------------------------------------------------------------------

_STEER_METRICS = {
    "logit_diff": "change in logit difference\n(positive - negative answer)",
    "flip_rate": "share flipped to the\nintended answer",
    "kl_neutral": "KL on neutral prompts (nats)\n(damage guard)",
}


def _draw_steering_dose_response(
    effects: pd.DataFrame, *, model=None, experiment=None, warnings: Sequence[str] = ()
) -> Figure:
    """Metrics (rows) x layers (columns): the direction's value against alpha, with the random
    band."""
    need = {"layer", "alpha", "source", "direction", "metric", "value", "ci_low", "ci_high"}
    missing = need - set(effects.columns)
    if missing:
        raise ValueError(f"steering effects table lacks columns {sorted(missing)}")
    main = effects[effects["source"] != "random"]
    band = effects[(effects["source"] == "random") & (effects["direction"] == "band")]
    if main.empty:
        raise ValueError("no steering rows for the direction (only random ones)")
    metrics = [m for m in _STEER_METRICS if m in set(main["metric"])]
    layers = sorted(int(L) for L in main["layer"].unique())
    source = str(main["source"].iloc[0])
    fig = new_figure(2.3 * len(layers) + 1.2, 2.0 * len(metrics) + 1.2)
    axes = fig.subplots(len(metrics), len(layers), squeeze=False, sharex=True, sharey="row")
    with style():
        for i, m in enumerate(metrics):
            for j, L in enumerate(layers):
                ax = axes[i][j]
                b = band[(band["metric"] == m) & (band["layer"] == L)].sort_values("alpha")
                if len(b):
                    ax.fill_between(
                        b["alpha"],
                        b["ci_low"],
                        b["ci_high"],
                        color="#bbbbbb",
                        alpha=0.6,
                        lw=0,
                        label="random directions (5-95%)",
                    )
                    ax.plot(
                        b["alpha"],
                        b["value"],
                        color="#777777",
                        ls="--",
                        lw=1.0,
                        label="random median",
                    )
                g = main[(main["metric"] == m) & (main["layer"] == L)].sort_values("alpha")
                yerr = np.vstack([g["value"] - g["ci_low"], g["ci_high"] - g["value"]]).clip(min=0)
                ax.errorbar(
                    g["alpha"],
                    g["value"],
                    yerr=yerr,
                    color=OKABE_ITO[0],
                    marker="o",
                    ms=3.5,
                    capsize=2,
                    lw=1.4,
                    label=f"{source} direction (95% interval over prompts)",
                )
                if "beyond_random" in g.columns:
                    _mark_beyond_band(ax, g, b)
                ax.axhline(0, color="black", lw=0.6)
                if i == 0:
                    ax.set_title(f"layer {L}")
                if i == len(metrics) - 1:
                    ax.set_xlabel("alpha (x mean residual norm)")
                if j == 0:
                    ax.set_ylabel(_STEER_METRICS[m])
        handles, labels = axes[0][0].get_legend_handles_labels()
        seen = dict(zip(labels, handles))
        fig.legend(
            seen.values(),
            seen.keys(),
            loc="outside lower center",
            ncol=min(4, len(seen)),
            fontsize=TICK_SIZE,
        )
        extra = _steering_counts(main, band)
        _suptitle(
            fig,
            _title(
                f"Steering dose-response: {experiment}" + (f"   (model: {model})" if model else ""),
                extra="\n".join(x for x in (extra, warning_text(warnings)) if x),
            ),
        )
    return fig


def _mark_beyond_band(ax, g: pd.DataFrame, b: pd.DataFrame) -> None:
    """Ring the direction's points outside the random band, with the side they lie on: an upward
    triangle above the band's upper edge, a downward one below its lower edge."""
    out = g[g["beyond_random"].astype(str) == "True"]
    edges = b.set_index("alpha")[["ci_low", "ci_high"]] if len(b) else None
    above = [
        edges is not None and a in edges.index and v > edges.at[a, "ci_high"]
        for a, v in zip(out["alpha"], out["value"])
    ]
    above = np.asarray(above, dtype=bool)
    for side, mask, marker in (("above", above, "^"), ("below", ~above, "v")):
        if mask.any():
            ax.scatter(
                out["alpha"][mask],
                out["value"][mask],
                s=46,
                marker=marker,
                facecolors="none",
                edgecolors=OKABE_ITO[1],
                zorder=5,
                label=f"{side} the random band",
            )


def _steering_counts(main: pd.DataFrame, band: pd.DataFrame) -> str:
    """One line saying what the points are: changes from the unsteered run, over how many
    prompts."""
    n = {
        m: int(main.loc[main["metric"] == m, "n"].max())
        for m in ("logit_diff", "kl_neutral")
        if "n" in main.columns and (main["metric"] == m).any()
    }
    parts = ["changes from the unsteered run (alpha = 0 gives 0)"]
    if "logit_diff" in n:
        parts.append(f"{n['logit_diff']} prompts")
    if "kl_neutral" in n:
        parts.append(f"{n['kl_neutral']} neutral prompts")
    if len(band) and "n" in band.columns:
        parts.append(f"{int(band['n'].max())} random directions")
    return "; ".join(parts)


def steering_dose_response(
    effects: pd.DataFrame,
    out,
    *,
    model=None,
    experiment=None,
    formats: Sequence[str] = ("png",),
    dpi: float = DEFAULT_DPI,
    warnings: Sequence[str] = (),
) -> list[str]:
    """Dose-response figure of a steering experiment (``effects.csv`` of
    :mod:`layerscope.jobs.steering_run`); ``warnings`` (its summary's) go into the subtitle."""
    fig = _draw_steering_dose_response(
        effects, model=model, experiment=experiment, warnings=warnings
    )
    return _finish(fig, out, formats, dpi)


# ------------------------------------------------------------------------------------------
# reliability diagram (probe calibration, issue 20)
# ------------------------------------------------------------------------------------------


def _draw_reliability(curves: Mapping[str, Any], *, title: str) -> Figure:
    """One line per probe family: observed rate against mean predicted probability per
    equal-mass bin, the diagonal of perfect calibration, ECE in the legend.
    ``curves``: family -> {"bins": [{"p_mean", "y_mean", "n"}], "ece": float}."""
    with style():
        fig = new_figure(4.8, 4.6)
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], color="#555555", linestyle="--", linewidth=1.0, label="calibrated")
        colors = palette(len(curves))
        for i, (name, c) in enumerate(curves.items()):
            p = [b["p_mean"] for b in c["bins"]]
            y = [b["y_mean"] for b in c["bins"]]
            ece = c.get("ece")
            label = name + (f" (ECE {ece:.3f})" if ece is not None else "")
            ax.plot(p, y, color=colors[i], marker=MARKERS[i % len(MARKERS)], label=label)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean predicted probability (equal-mass bin)")
        ax.set_ylabel("observed rate")
        ax.legend(loc="upper left", fontsize="small")
        ax.set_title(title)
    return fig


def reliability_diagram(
    curves: Mapping[str, Any],
    out,
    *,
    title: str = "Reliability of held-out probe probabilities",
    formats: Sequence[str] = ("png",),
    dpi: float = DEFAULT_DPI,
) -> list[str]:
    """Draw and save :func:`_draw_reliability`; returns the written paths."""
    return _finish(_draw_reliability(curves, title=title), out, formats, dpi)
