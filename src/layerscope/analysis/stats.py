"""Descriptive statistics of cached activations, per layer and label.

* :func:`activation_stats` -- a tidy table: one row per (layer, component, pooling, label)
  with element-wise summary statistics and the mean per-prompt L2 norm, plus "difference"
  rows contrasting the labels (see there for the exact convention).
* :func:`prompt_norms` -- the L2 norm of every prompt's pooled vector at every layer,
  ``[n_prompts, n_layers]`` (what :func:`layerscope.plotting.plots.norm_heatmap` draws).

Both accept the layers as a :class:`~layerscope.data.h5cache.LayerStack`, a ``dict`` mapping the
layer number to an ``[n_prompts, d_model]`` array (or to a
:class:`~layerscope.data.h5cache.LayerData`), or a 3-D array ``[n_layers, n_prompts, d_model]``
(layers then numbered ``0..n_layers-1``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from layerscope.errors import InputError

__all__ = [
    "COLUMNS",
    "STAT_COLUMNS",
    "DIFF_LABEL",
    "ALL_LABEL",
    "activation_stats",
    "prompt_norms",
    "iter_layers",
]

#: label value of the binary "positive minus negative" rows.
DIFF_LABEL = "<diff>"
#: label value of the rows over all prompts regardless of label.
ALL_LABEL = "<all>"
#: the per-group statistics (also the columns that are differenced on the diff rows).
STAT_COLUMNS = ["mean", "std", "min", "max", "mean_l2_norm", "frac_near_zero"]
COLUMNS = [
    "layer",
    "component",
    "pooling",
    "label",
    "kind",
    "contrast",
    "n",
    *STAT_COLUMNS,
    "mean_diff_l2",
]


class StatsInputError(InputError, ValueError):
    """Arrays given to a stats function cannot be used."""


def iter_layers(stack: Any) -> list[tuple[int, np.ndarray]]:
    """``[(layer, X [n_prompts, d_model]), ...]`` sorted by layer, from any accepted container."""
    X = getattr(stack, "X", None)
    layers = getattr(stack, "layers", None)
    if X is not None and layers is not None:  # LayerStack
        X = np.asarray(X)
        if X.ndim != 3 or X.shape[0] != len(layers):
            raise StatsInputError(
                f"LayerStack.X must be [n_layers={len(layers)}, n, d], got {X.shape}"
            )
        pairs = [(int(L), X[k]) for k, L in enumerate(layers)]
    elif isinstance(stack, Mapping):
        pairs = [(int(L), np.asarray(getattr(v, "X", v))) for L, v in stack.items()]
    else:
        X = np.asarray(stack)
        if X.ndim != 3:
            raise StatsInputError(
                f"expected a LayerStack, a dict layer -> [n, d] or a 3-D array, got shape {X.shape}"
            )
        pairs = [(k, X[k]) for k in range(X.shape[0])]
    if not pairs:
        raise StatsInputError("no layers given")
    pairs.sort(key=lambda p: p[0])
    n = None
    for L, x in pairs:
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise StatsInputError(
                f"layer {L}: expected a non-empty [n_prompts, d_model] array, got shape {x.shape}"
            )
        if n is None:
            n = x.shape[0]
        elif x.shape[0] != n:
            raise StatsInputError(
                f"layer {L} has {x.shape[0]} prompts, layer {pairs[0][0]} has {n}"
            )
    return pairs


def _stack_labels(stack: Any, labels: Sequence[Any] | None) -> Sequence[Any]:
    if labels is not None:
        return labels
    found = getattr(stack, "labels", None)
    if found is None and isinstance(stack, Mapping) and stack:
        found = getattr(next(iter(stack.values())), "labels", None)
    if found is None:
        raise StatsInputError("labels not given and the stack carries none")
    return found


def _group_stats(x: np.ndarray, near_zero: float) -> dict[str, float]:
    return {
        "mean": float(x.mean()),
        "std": float(x.std()),
        "min": float(x.min()),
        "max": float(x.max()),
        "mean_l2_norm": float(np.linalg.norm(x, axis=1).mean()),
        "frac_near_zero": float(np.mean(np.abs(x) < near_zero)),
    }


def activation_stats(
    stack: Any,
    labels: Sequence[Any] | None = None,
    *,
    component: str,
    pooling: str,
    near_zero: float = 1e-3,
    positive_class: Any = None,
) -> pd.DataFrame:
    """Tidy per-(layer, label) activation statistics, with label-difference rows.

    ``stack``: layers -> ``X [n_prompts, d_model]`` (see the module docstring); ``labels``:
    one per prompt (default: ``stack.labels``). Columns (``COLUMNS``):

    * ``layer, component, pooling``; ``label`` -- ``str`` of the label (so it can share a
      column with the special values below); ``kind`` -- ``"label"``, ``"all"`` or ``"diff"``;
      ``contrast`` -- for diff rows a readable ``"a - b"``, else None; ``n`` -- prompts used.
    * Over all ``n * d_model`` elements of the group's vectors: ``mean``, ``std`` (population,
      ddof=0), ``min``, ``max`` and ``frac_near_zero`` (fraction with ``|x| < near_zero``);
      ``mean_l2_norm`` -- the mean over the group's prompts of each vector's L2 norm.
    * ``mean_diff_l2`` -- diff rows only (NaN elsewhere): the L2 norm of the difference of the
      two groups' mean vectors, ``||mean(X_a) - mean(X_b)||``.

    Rows per layer: one per label (classes sorted, as the probes sort them), one with
    ``label = "<all>"`` over every prompt, then the difference rows, whose ``STAT_COLUMNS``
    hold ``stat(a) - stat(b)`` and whose ``n`` is ``n_a + n_b``:

    * binary labels: one row with ``label = "<diff>"``, ``a`` = the positive class (the last
      class in sorted order, or ``positive_class``), ``b`` = the other class -- the same
      convention as :func:`layerscope.analysis.probes.fit_probe`;
    * three or more labels: one row per class ``c`` with ``label = "<diff:c>"``, ``a = c``
      and ``b`` = all other prompts ("one vs rest", ``contrast = "c - rest"``).
    """
    pairs = iter_layers(stack)
    y = np.asarray(_stack_labels(stack, labels))
    n = pairs[0][1].shape[0]
    classes = _stats_classes(y, n, near_zero, positive_class)
    masks = {c: y == c for c in classes}
    rows: list[dict[str, Any]] = []
    base = {"component": component, "pooling": pooling}
    for layer, X in pairs:
        X = np.asarray(X, dtype=np.float64)
        if not np.all(np.isfinite(X)):
            raise StatsInputError(f"layer {layer}: activations contain NaN or infinite values")
        rows += _layer_rows(X, classes, masks, near_zero, {"layer": layer, **base})
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["mean_diff_l2"] = df["mean_diff_l2"].astype(np.float64)
    return df


def _stats_classes(y: np.ndarray, n: int, near_zero: float, positive_class: Any) -> list[Any]:
    """Check the labels and settings; the classes sorted, a binary positive class last."""
    if y.ndim != 1 or y.shape[0] != n:
        raise StatsInputError(
            f"labels must be 1-D with {n} entries (one per prompt), got shape {y.shape}"
        )
    if not (near_zero >= 0):
        raise StatsInputError(f"near_zero must be >= 0, got {near_zero}")
    classes = list(np.unique(y))
    if positive_class is not None:
        if len(classes) != 2:
            raise StatsInputError("positive_class only applies to binary labels")
        if positive_class not in classes:
            raise StatsInputError(
                f"positive_class {positive_class!r} is not one of the classes {classes}"
            )
        classes = [c for c in classes if c != positive_class] + [
            c for c in classes if c == positive_class
        ]
    return classes


def _layer_rows(X, classes, masks, near_zero, key) -> list[dict[str, Any]]:
    """One layer's rows: per label, over all prompts, then the difference rows."""
    rows: list[dict[str, Any]] = []
    per: dict[Any, dict[str, float]] = {}
    for c in classes:
        s = _group_stats(X[masks[c]], near_zero)
        per[c] = s
        rows.append(
            {
                **key,
                "label": str(c),
                "kind": "label",
                "contrast": None,
                "n": int(masks[c].sum()),
                **s,
                "mean_diff_l2": np.nan,
            }
        )
    rows.append(
        {
            **key,
            "label": ALL_LABEL,
            "kind": "all",
            "contrast": None,
            "n": X.shape[0],
            **_group_stats(X, near_zero),
            "mean_diff_l2": np.nan,
        }
    )
    for label, contrast, ma, mb, sa, sb in _contrasts(X, classes, masks, per, near_zero):
        diff_vec = X[ma].mean(axis=0) - X[mb].mean(axis=0)
        rows.append(
            {
                **key,
                "label": label,
                "kind": "diff",
                "contrast": contrast,
                "n": int(ma.sum() + mb.sum()),
                **{k: sa[k] - sb[k] for k in STAT_COLUMNS},
                "mean_diff_l2": float(np.linalg.norm(diff_vec)),
            }
        )
    return rows


def _contrasts(X, classes, masks, per, near_zero) -> list[tuple]:
    """(label, contrast, mask a, mask b, stats a, stats b) of each difference row."""
    if len(classes) == 2:
        neg, pos = classes
        return [(DIFF_LABEL, f"{pos} - {neg}", masks[pos], masks[neg], per[pos], per[neg])]
    contrasts = []
    if len(classes) > 2:
        for c in classes:
            rest = ~masks[c]
            contrasts.append(
                (
                    f"<diff:{c}>",
                    f"{c} - rest",
                    masks[c],
                    rest,
                    per[c],
                    _group_stats(X[rest], near_zero),
                )
            )
    return contrasts


def prompt_norms(stack: Any) -> np.ndarray:
    """L2 norm of each prompt's vector at each layer: ``[n_prompts, n_layers]`` (layers sorted).

    Computed in float64 whatever the stored dtype (float16 squares overflow easily).
    """
    pairs = iter_layers(stack)
    return np.stack(
        [np.linalg.norm(np.asarray(X, dtype=np.float64), axis=1) for _, X in pairs], axis=1
    )
