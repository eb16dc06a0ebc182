"""Task-vector figures: separation and norms vs layer, prompt cosine heatmap, task PCA.

Draw functions return a pyplot-free Figure (:func:`layerscope.plotting.plots.new_figure`); the
``plot_*`` wrappers write it in every format with :func:`layerscope.plotting.plots.save_figure`.
The numbers come from :mod:`layerscope.analysis.task_vectors`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.lines import Line2D

from layerscope.analysis.task_vectors import (
    TaskVectorError,
    best_layer,
    norms_long,
    pca_of_prompts,
)
from layerscope.plotting.plots import new_figure, save_figure

__all__ = [
    "draw_norms",
    "draw_prompt_cosine",
    "draw_separation",
    "draw_task_pca",
    "plot_norms",
    "plot_prompt_cosine",
    "plot_separation",
    "plot_task_pca",
]

_IMAGE_SUFFIXES = {".png", ".pdf", ".svg", ".jpg", ".jpeg"}


def _targets(out: str | os.PathLike, formats: Sequence[str]) -> tuple[Path, list[str]]:
    """The first file to write and every format: ``out`` without its image suffix, per format."""
    out = Path(out)
    base = out.with_suffix("") if out.suffix.lower() in _IMAGE_SUFFIXES else out
    if not formats:
        raise TaskVectorError("formats: give at least one format, e.g. ('png',)")
    targets = [Path(f"{base}.{fmt.lstrip('.').lower()}") for fmt in formats]
    return targets[0], [t.suffix[1:] for t in targets]


def _write(fig, out: str | os.PathLike, formats: Sequence[str]) -> list[Path]:
    """Write ``fig`` as ``out`` in every format (see :func:`_targets`), then drop its artists."""
    first, suffixes = _targets(out, formats)
    try:
        return [Path(p) for p in save_figure(fig, first, suffixes, dpi=150, tight=True)]
    finally:
        fig.clear()


def _title(
    what: str,
    model: str | None,
    dataset: str | None,
    component: str | None,
    layer: int | None = None,
) -> str:
    """``what`` over a second line naming model, dataset, component and layer (those given)."""
    parts = [p for p in (model, dataset, component) if p]
    if layer is not None:
        parts.append(f"layer {layer}")
    return what + ("\n" + " | ".join(str(p) for p in parts) if parts else "")


def _task_colors(n: int):
    """``n`` distinct task colours (tab10, or tab20 beyond ten tasks)."""
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_separation(
    scores: pd.DataFrame, out: str | os.PathLike, *, formats: Sequence[str] = ("png",), **kw: Any
) -> list[Path]:
    """Draw :func:`draw_separation` and write it in every format."""
    fig = draw_separation(scores, **kw)
    return _write(fig, out, formats)


def draw_separation(
    scores: pd.DataFrame,
    *,
    model: str | None = None,
    dataset: str | None = None,
    component: str | None = None,
    ci: float = 0.95,
):
    """Separation (within - between) vs layer with its bootstrap interval; means below.

    ``ci`` only labels the band (the interval itself is in the score columns).
    """
    s = scores.sort_values("layer")
    x = s["layer"].to_numpy()
    fig = new_figure(7, 6, layout=None)
    ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    ax.fill_between(
        x,
        s["separation_ci_low"],
        s["separation_ci_high"],
        color="C0",
        alpha=0.25,
        label=f"{100 * ci:g}% bootstrap interval (over pairs)",
    )
    ax.plot(x, s["separation"], "o-", color="C0", label="separation = within - between")
    ax.axhline(0, color="0.3", lw=0.8)
    best = best_layer(s)
    ax.axvline(best, color="C3", ls="--", lw=1, label=f"best layer {best}")
    ax.set_ylabel("mean cosine difference")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(_title("Task separation by layer", model, dataset, component), fontsize=10)
    ax.grid(alpha=0.3)
    ax2.plot(x, s["within"], "o-", color="C2", label="within task (different pair)")
    matched = not (
        "between_all" in s and np.allclose(s["between"], s["between_all"], equal_nan=True)
    )
    ax2.plot(
        x,
        s["between"],
        "s-",
        color="C1",
        label="between tasks (different pair)" if matched else "between tasks (all pairs)",
    )
    if "same_pair" in s:
        ax2.plot(x, s["same_pair"], "^:", color="0.5", label="same pair, different task")
    ax2.axhline(0, color="0.3", lw=0.8)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("mean cosine (centred)")
    ax2.legend(fontsize=8, loc="best")
    ax2.grid(alpha=0.3)
    ax2.set_xticks(x if len(x) <= 40 else x[:: max(1, len(x) // 20)])
    return fig


def plot_norms(
    scores: pd.DataFrame, out: str | os.PathLike, *, formats: Sequence[str] = ("png",), **kw: Any
) -> list[Path]:
    """Draw :func:`draw_norms` and write it in every format."""
    fig = draw_norms(scores, **kw)
    return _write(fig, out, formats)


def draw_norms(
    scores: pd.DataFrame,
    *,
    model: str | None = None,
    dataset: str | None = None,
    component: str | None = None,
    relative: bool = True,
):
    """Task-vector L2 norm per task vs layer (and, with ``relative``, norm / centred RMS norm)."""
    long = norms_long(scores)
    tasks = list(dict.fromkeys(long["task"]))
    colors = _task_colors(len(tasks))
    ncols = 2 if relative else 1
    fig = new_figure(6 * ncols, 4.2, layout=None)
    axes = fig.subplots(1, ncols, squeeze=False)
    panels = [("norm", "task-vector L2 norm")]
    if relative:
        panels.append(("rel_norm", "norm / RMS norm of centred prompts"))
    for ax, (col, ylabel) in zip(axes[0], panels):
        for task, color in zip(tasks, colors):
            d = long[long["task"] == task]
            ax.plot(d["layer"], d[col], "o-", ms=3, color=color, label=task)
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(title="task", fontsize=8, loc="best")
    fig.suptitle(_title("Task-vector norms by layer", model, dataset, component), fontsize=10)
    fig.tight_layout()
    return fig


def plot_prompt_cosine(
    matrix: Any,
    tasks: Sequence[Any],
    pairs: Sequence[Any],
    out: str | os.PathLike,
    *,
    formats: Sequence[str] = ("png",),
    **kw: Any,
) -> list[Path]:
    """Draw :func:`draw_prompt_cosine` and write it in every format."""
    fig = draw_prompt_cosine(matrix, tasks, pairs, **kw)
    return _write(fig, out, formats)


def _name_task_blocks(ax, tasks: Sequence[str], starts, ends, fs: float) -> None:
    """Name each task block on the left and on top: centred on the block, outside the ticks."""
    for s, e in zip(starts, ends):
        mid = (s + e - 1) / 2
        ax.annotate(
            tasks[s],
            xy=(0, mid),
            xycoords=("axes fraction", "data"),
            xytext=(-6.5 * fs, 0),
            textcoords="offset points",
            ha="right",
            va="center",
            fontsize=fs + 2,
            fontweight="bold",
        )
        ax.annotate(
            tasks[s],
            xy=(mid, 1),
            xycoords=("data", "axes fraction"),
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=fs + 1,
            fontweight="bold",
        )


def draw_prompt_cosine(
    matrix: Any,
    tasks: Sequence[Any],
    pairs: Sequence[Any],
    *,
    layer: int,
    model: str | None = None,
    dataset: str | None = None,
    component: str | None = None,
    vmax: float | str = 1.0,
):
    """Heatmap of the prompt cosine matrix (rows already ordered by task, then pair).

    Diverging colormap centred at 0, limits ``[-vmax, vmax]``: 1.0 by default, so heatmaps of
    different layers share one scale; ``vmax="auto"`` stretches to the largest off-diagonal
    magnitude (the diagonal, 1 by definition, is then beyond the scale; the colorbar says so).
    Ticks are the pairs; task blocks are outlined and named on the left and top.
    """
    M = np.asarray(matrix, dtype=float)
    n = M.shape[0]
    if M.shape != (n, n) or len(tasks) != n or len(pairs) != n:
        raise TaskVectorError(
            f"matrix {M.shape} does not match {len(tasks)} tasks / {len(pairs)} pairs"
        )
    if vmax == "auto":
        off = M[~np.eye(n, dtype=bool)]
        off = off[np.isfinite(off)]
        vmax = float(np.max(np.abs(off))) if off.size else 1.0
        vmax = min(1.0, max(vmax, 1e-3))
    vmax = float(vmax)
    tasks = [str(t) for t in tasks]
    starts = [i for i in range(n) if i == 0 or tasks[i] != tasks[i - 1]]
    ends = starts[1:] + [n]
    side = float(np.clip(2.5 + 0.2 * n, 5, 11))
    fs = float(np.clip(300 / max(n, 1), 5, 9))
    fig = new_figure(side + 1.6, side, layout=None)
    ax = fig.subplots()
    im = ax.imshow(M, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels([str(p) for p in pairs], rotation=90, fontsize=fs)
    ax.set_yticklabels([str(p) for p in pairs], fontsize=fs)
    for s in starts[1:]:
        ax.axhline(s - 0.5, color="k", lw=0.8)
        ax.axvline(s - 0.5, color="k", lw=0.8)
    _name_task_blocks(ax, tasks, starts, ends, fs)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.set_label(
        "cosine similarity (centred vectors)" + ("; diagonal = 1 is off scale" if vmax < 1 else "")
    )
    ax.set_title(
        _title(
            "Prompt cosine similarity, ordered by task then number pair",
            model,
            dataset,
            component,
            layer,
        ),
        fontsize=10,
        pad=8 + 2.2 * fs,
    )
    return fig


def plot_task_pca(
    X: Any,
    tasks: Sequence[Any],
    out: str | os.PathLike,
    *,
    formats: Sequence[str] = ("png",),
    **kw: Any,
) -> list[Path]:
    """Draw :func:`draw_task_pca` and write it in every format."""
    fig = draw_task_pca(X, tasks, **kw)
    return _write(fig, out, formats)


def draw_task_pca(
    X: Any,
    tasks: Sequence[Any],
    *,
    layer: int,
    model: str | None = None,
    dataset: str | None = None,
    component: str | None = None,
    pairs: Sequence[Any] | None = None,
):
    """PCA (2D) of the prompt vectors ``X`` [n, d] of one layer, coloured by task.

    Each task's mean (its task vector, projected) is drawn as a large labelled marker.
    With ``pairs``, each prompt is annotated with its pair (small grey text) when n <= 60.
    """
    pca = pca_of_prompts(X, tasks, n_components=2)
    coords, ev = pca["coords"], pca["explained_variance_ratio"]
    levels = pca["tasks"]
    colors = _task_colors(len(levels))
    tasks = [str(t) for t in tasks]
    fig = new_figure(7, 6, layout=None)
    ax = fig.subplots()
    for j, (task, color) in enumerate(zip(levels, colors)):
        m = np.array([t == task for t in tasks])
        ax.scatter(
            coords[m, 0], coords[m, 1], s=28, color=color, alpha=0.75, label=task, edgecolors="none"
        )
        cx, cy = pca["task_coords"][j]
        ax.scatter(
            [cx], [cy], s=180, marker="X", color=color, edgecolors="k", linewidths=1.0, zorder=3
        )
    if pairs is not None and len(tasks) <= 60:
        for (x0, y0), p in zip(coords, pairs):
            ax.annotate(
                str(p), (x0, y0), xytext=(3, 3), textcoords="offset points", fontsize=6, color="0.4"
            )
    ax.axhline(0, color="0.8", lw=0.8, zorder=0)
    ax.axvline(0, color="0.8", lw=0.8, zorder=0)
    ax.set_xlabel(f"PC1 ({100 * ev[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * ev[1]:.1f}% of variance)")
    handles, labels = ax.get_legend_handles_labels()
    handles.append(
        Line2D(
            [],
            [],
            marker="X",
            color="w",
            markerfacecolor="0.6",
            markeredgecolor="k",
            markersize=11,
            linestyle="",
        )
    )
    labels.append("task mean (task vector)")
    ax.legend(handles, labels, title="task", fontsize=8, loc="best")
    ax.set_title(
        _title("PCA of prompt vectors, coloured by task", model, dataset, component, layer),
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    return fig
