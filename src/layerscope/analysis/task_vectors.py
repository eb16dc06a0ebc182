"""Task vectors and task geometry per layer: pure functions on arrays, plus writers.

The figures are drawn by :mod:`layerscope.plotting.task_vectors`.

The question answered per layer is "do prompts of the same task point the same way, more than
prompts of different tasks do, and how sure are we?". Input is one vector per prompt (pooled
activations, ``X`` of shape ``(n, d)`` per layer), the task of each prompt and its *pair* (the
number pair ``"a_b"`` of the ``task_grid`` dataset; every pair is asked under every task).

Definitions (one layer, :func:`task_geometry`)
----------------------------------------------
* Centring: ``C = X - mean(X, axis=0)``; the centroid is the plain mean over *prompts* (with
  unbalanced tasks it is not the mean of the task means).
* Prompt cosine matrix ``S[i, j] = cos(C[i], C[j])``, rows/columns ordered by task (in order of
  first appearance, or ``task_order``) then pair (order of first appearance). A prompt whose
  centred vector is zero has an undefined cosine: its row/column is NaN and it is left out of
  every mean below.
* Task vector of task ``t``: the mean of the centred vectors of its prompts; ``norm`` is its L2
  norm (it shrinks like ``1/sqrt(m)`` for pure noise, ``m`` prompts per task; compare with
  ``centred_rms``, the root-mean-square norm of the centred prompt vectors of that layer).
  ``task_cosine`` is the k x k cosine matrix of the task vectors.
* Means of ``S`` over unordered pairs of *distinct prompts*:

  - ``within``: same task, different pair;
  - ``between``: different task, different pair (the default contrast, see below);
  - ``same_pair``: different task, same pair;
  - ``between_all``: different task, any pair.

  ``separation = within - between``. Within-task comparisons are always between different
  pairs, so the default ``between`` is restricted to different pairs too: then anything that
  depends only on the pair (the numbers, shared by all tasks) cancels, and a layer that encodes
  the numbers but not the task scores ~0 rather than below 0. ``between="all"`` uses
  ``between_all`` instead (pair signal then pushes ``separation`` below 0). ``same_pair -
  between`` (column ``pair_separation``) measures how much the *pair* is encoded.
* ``ratio = within / between`` only where ``between > 0``; otherwise NaN. After centring the
  mean cosine over all pairs of prompts is about ``-1/(n-1)``, so ``between`` is often <= 0 and
  the ratio is then undefined; ``separation`` is the primary score. ``ratio_shifted =
  (1 + within) / (1 + between)`` (cosines moved to [0, 2]) is always defined for ``between >
  -1`` and is reported alongside.

Bootstrap (over pairs)
----------------------
The number pairs are the resampling unit (all prompts of a pair -- one per task -- move
together). Each of ``n_boot`` resamples draws the distinct pairs with replacement (seeded
``numpy.random.default_rng(seed)``; the same draws are used at every layer, so differences
between layers are paired). A pair drawn ``c`` times contributes ``c`` copies of each of its
prompts; the copies are distinct items, so each pair of prompts ``(i, j)`` counts with weight
``c_i * c_j``. Pairs of copies of the *same* prompt are excluded (they would be a prompt's
similarity with itself, cosine 1, counted as "within"); copies of one number pair under
different tasks count as ``same_pair`` (not ``between``), exactly as for the original prompts.

By default (``recentre=False``) the centroid and the cosine matrix are those of the full data
and a resample re-weights which prompt pairs enter the means. The centroid is an average over
all prompts and is treated as fixed: its own uncertainty is not propagated. With
``recentre=True`` the centroid (weighted by the copies), norms and cosines are recomputed for
every resample (from the n x n Gram matrix, so cost does not grow with ``d_model``). That looks
more complete but is biased: a resample holds only ~63 % distinct pairs, so centring removes
more of the pair and noise variance and the resampled cosines are inflated (on the planted test
data: separation 0.81, recentred interval [0.82, 0.92], i.e. not even containing the estimate;
fixed-centroid interval [0.79, 0.85]). Hence the default.

The interval is the percentile interval (2.5 %, 97.5 % for ``ci = 0.95``) of the resampled
values; resamples where a mean is undefined (e.g. a task left with a single distinct pair, so
no within-task pair) are dropped and counted (``n_boot_valid``). A percentile interval
usually, but not necessarily, contains the point estimate. ``delta_prev`` is ``separation``
minus that of the previous layer in the table, with its paired interval: it locates the layer
where task identity appears. With ``pairs=None`` every prompt is its own pair and the
bootstrap resamples prompts.

Files (:func:`write_task_vectors`)
----------------------------------
HDF5 (``kind = "task_vectors"``)::

    tasks          utf-8 [k]            task order of every k-sized axis
    prompt_ids     utf-8 [n]            prompt order of every n-sized axis (task, then pair)
    prompt_tasks   utf-8 [n]
    prompt_pairs   utf-8 [n]
    order          int64 [n]            position of each row in the input prompt order
    layers         int64 [n_layers]
    bootstrap/separation  float [n_boot, n_layers]   resampled separation (NaN: undefined)
    layer_{L}/prompt_cosine   float [n, n]
    layer_{L}/task_cosine     float [k, k]
    layer_{L}/task_vectors    float [k, d_model]
    layer_{L}/task_norms      float [k]

Root attributes: ``kind``, ``format_version``, ``n_boot``, ``seed``, ``ci``, ``between``,
caller attributes (model, dataset, component, pooling ...) and ``complete = True`` (last).
The CSV holds the tidy per-layer scores (one row per layer, ``norm_{task}`` columns);
:func:`norms_long` turns those into a long (layer, task, norm) table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from layerscope.atomic import atomic_path
from layerscope.errors import LayerscopeError

FORMAT_VERSION = 1
BETWEEN_MODES = ("different_pair", "all")
#: Largest number of Gram-matrix entries handled at once in the bootstrap (bounds memory).
_BOOT_CHUNK_ENTRIES = 4_000_000
_EPS = 1e-12


class TaskVectorError(LayerscopeError, ValueError):
    """Bad input to the task-vector functions."""


# --------------------------------------------------------------------------------------------
# input handling


def _codes(
    values: Sequence[Any], order: Sequence[Any] | None, name: str
) -> tuple[np.ndarray, list[str]]:
    """Map values to integer codes in order of first appearance (or ``order``)."""
    vals = [str(v) for v in values]
    if order is None:
        levels = list(dict.fromkeys(vals))
    else:
        levels = [str(v) for v in order]
        if len(set(levels)) != len(levels):
            raise TaskVectorError(f"{name}: order has duplicates: {levels}")
        missing = sorted(set(vals) - set(levels))
        if missing:
            raise TaskVectorError(f"{name}: values {missing} are not in the given order {levels}")
        present = set(vals)
        levels = [v for v in levels if v in present]
    index = {v: i for i, v in enumerate(levels)}
    return np.array([index[v] for v in vals], dtype=np.int64), levels


def _check_X(X: Any, ndim: int, name: str = "X") -> np.ndarray:
    """``X`` as float64 with ``ndim`` dimensions, at least 2 prompts, all finite."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != ndim:
        raise TaskVectorError(f"{name}: expected {ndim} dimensions, got shape {X.shape}")
    if X.shape[-2] < 2:
        raise TaskVectorError(f"{name}: need at least 2 prompts, got {X.shape[-2]}")
    if not np.all(np.isfinite(X)):
        raise TaskVectorError(f"{name}: contains NaN or inf")
    return X


def _prepare(n: int, tasks: Sequence[Any], pairs: Sequence[Any] | None, task_order=None):
    """Task-then-pair order of the prompts, their label codes and the levels."""
    if len(tasks) != n:
        raise TaskVectorError(f"tasks: {len(tasks)} entries for {n} prompts")
    if pairs is None:
        pairs = [str(i) for i in range(n)]
    elif len(pairs) != n:
        raise TaskVectorError(f"pairs: {len(pairs)} entries for {n} prompts")
    t_codes, task_levels = _codes(tasks, task_order, "tasks")
    p_codes, pair_levels = _codes(pairs, None, "pairs")
    # Stable sort: by task, then pair, then input order.
    order = np.lexsort((np.arange(n), p_codes, t_codes))
    return order, t_codes[order], p_codes[order], task_levels, pair_levels


def _masks(t: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """Prompt-pair masks: within task, between tasks, same pair, between (all)."""
    same_t = t[:, None] == t[None, :]
    same_p = p[:, None] == p[None, :]
    distinct = ~np.eye(len(t), dtype=bool)
    return {
        "within": same_t & ~same_p,
        "between": ~same_t & ~same_p,
        "same_pair": ~same_t & same_p,
        "between_all": ~same_t & distinct,
    }


def _cosine_from_centred(C: np.ndarray) -> np.ndarray:
    """Cosine matrix of the rows of ``C`` (NaN for a row of norm ~0)."""
    norms = np.linalg.norm(C, axis=1)
    ok = norms > _EPS * max(1.0, float(norms.max(initial=0.0)))
    U = np.where(ok[:, None], C / np.where(ok, norms, 1.0)[:, None], np.nan)
    S = U @ U.T
    np.clip(S, -1.0, 1.0, out=S)
    return S


def _masked_mean(S: np.ndarray, mask: np.ndarray) -> float:
    """Mean of the finite entries of ``S`` under ``mask`` (NaN if none)."""
    vals = S[mask & np.isfinite(S)]
    return float(vals.mean()) if vals.size else float("nan")


def _ratios(within: float, between: float) -> tuple[float, float]:
    """within / between and (1 + within) / (1 + between), NaN where undefined."""
    ratio = within / between if np.isfinite(between) and between > 0 else float("nan")
    shifted = (
        (1 + within) / (1 + between) if np.isfinite(between) and between > -1 else float("nan")
    )
    return float(ratio), float(shifted)


# --------------------------------------------------------------------------------------------
# one layer


def task_geometry(
    X: Any,
    tasks: Sequence[Any],
    pairs: Sequence[Any] | None,
    *,
    task_order: Sequence[Any] | None = None,
    between: str = "different_pair",
) -> dict[str, Any]:
    """Geometry of one layer: ``X`` [n, d], the task and pair of each prompt (input order).

    Returns a dict with (all n-sized axes in the returned ``order``: task, then pair):
    ``order`` (input index of each row), ``tasks`` (k task names), ``prompt_tasks``,
    ``prompt_pairs``, ``centroid`` [d], ``centred`` [n, d], ``prompt_cosine`` [n, n],
    ``task_vectors`` [k, d], ``task_cosine`` [k, k], ``task_norms`` [k], ``task_counts`` [k],
    ``centred_rms``, and the scores ``within``, ``between``, ``same_pair``, ``between_all``,
    ``separation``, ``pair_separation``, ``ratio``, ``ratio_shifted`` (see the module docs).
    """
    if between not in BETWEEN_MODES:
        raise TaskVectorError(f"between must be one of {BETWEEN_MODES}, got {between!r}")
    X = _check_X(X, 2)
    n = X.shape[0]
    order, t, p, task_levels, pair_levels = _prepare(n, tasks, pairs, task_order)
    Xo = X[order]
    centroid = Xo.mean(axis=0)
    C = Xo - centroid
    S = _cosine_from_centred(C)
    k = len(task_levels)
    counts = np.bincount(t, minlength=k)
    V = np.stack([C[t == j].mean(axis=0) for j in range(k)])
    norms = np.linalg.norm(V, axis=1)
    T = _cosine_from_centred(V)
    masks = _masks(t, p)
    means = {name: _masked_mean(S, m) for name, m in masks.items()}
    b = means["between"] if between == "different_pair" else means["between_all"]
    ratio, shifted = _ratios(means["within"], b)
    return {
        "order": order,
        "tasks": task_levels,
        "prompt_tasks": [task_levels[i] for i in t],
        "prompt_pairs": [pair_levels[i] for i in p],
        "centroid": centroid,
        "centred": C,
        "prompt_cosine": S,
        "task_vectors": V,
        "task_cosine": T,
        "task_norms": norms,
        "task_counts": counts,
        "centred_rms": float(np.sqrt(np.mean(np.sum(C * C, axis=1)))),
        **means,
        "separation": means["within"] - b,
        "pair_separation": means["same_pair"] - means["between"],
        "ratio": ratio,
        "ratio_shifted": shifted,
        "between_mode": between,
    }


# --------------------------------------------------------------------------------------------
# bootstrap


def bootstrap_weights(pair_codes: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Weights [n_boot, n]: how often each prompt's pair was drawn in each resample."""
    n_pairs = int(pair_codes.max()) + 1
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_pairs, size=(n_boot, n_pairs))
    counts = np.zeros((n_boot, n_pairs), dtype=np.float64)
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    return counts[:, pair_codes]


def _boot_means(
    C: np.ndarray, W: np.ndarray, masks: Mapping[str, np.ndarray], *, recentre: bool = False
) -> dict[str, np.ndarray]:
    """Weighted means of the cosine matrix per resample (weights ``W`` [B, n]).

    ``C`` are the centred vectors of the full data. Pair ``(i, j)`` of a category counts with
    weight ``W[b, i] * W[b, j]``; the masks never contain ``i == j``, so copies of one prompt are
    never compared with each other.

    ``recentre=False`` (default): the cosine matrix of the full data is kept; the resample only
    changes which pairs enter the means. ``recentre=True``: the centroid (weighted mean), norms
    and cosines are recomputed per resample from the Gram matrix ``K = C C^T``: with
    ``a = W K / sum(W)`` and ``b = w K w / sum(W)^2`` the re-centred Gram matrix is
    ``K - a_i - a_j + b``.
    """
    n = C.shape[0]
    B = W.shape[0]
    out = {name: np.empty(B) for name in masks}
    mf = {name: m.astype(np.float64) for name, m in masks.items()}
    if not recentre:
        S = _cosine_from_centred(C)
        ok = np.isfinite(S)
        S0 = np.where(ok, S, 0.0)
        for name, m in mf.items():
            num = np.sum((W @ (S0 * m)) * W, axis=1)
            den = np.sum((W @ (ok * m)) * W, axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[name][:] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
        return out
    K = C @ C.T
    step = max(1, _BOOT_CHUNK_ENTRIES // max(1, n * n))
    scale = max(float(np.max(np.abs(np.diag(K)), initial=0.0)), 1e-300)
    for s in range(0, B, step):
        w = W[s : s + step]
        tot = w.sum(axis=1)
        a = (w @ K) / tot[:, None]
        bb = np.einsum("bi,bi->b", a, w) / tot
        Kc = K[None] - a[:, :, None] - a[:, None, :] + bb[:, None, None]
        diag = np.einsum("bii->bi", Kc)
        ok = (diag > _EPS * scale) & (w > 0)
        inv = np.where(ok, 1.0 / np.sqrt(np.where(ok, diag, 1.0)), 0.0)
        S = Kc * inv[:, :, None] * inv[:, None, :]
        np.clip(S, -1.0, 1.0, out=S)
        wv = w * ok  # weights of prompts with a defined cosine
        for name, m in mf.items():
            num = np.sum(np.matmul(S * m, wv[:, :, None])[:, :, 0] * wv, axis=1)
            den = np.sum((wv @ m) * wv, axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[name][s : s + step] = np.where(
                    den > 0, num / np.where(den > 0, den, 1.0), np.nan
                )
    return out


def _interval(values: np.ndarray, ci: float) -> tuple[float, float, int]:
    """Percentile interval of the finite values and how many there are."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return float("nan"), float("nan"), 0
    lo, hi = np.percentile(v, [50 * (1 - ci), 50 * (1 + ci)])
    return float(lo), float(hi), int(v.size)


# --------------------------------------------------------------------------------------------
# all layers


def _unpack(stack: Any):
    """(X, layers, tasks, pairs, prompt_ids, meta) from a LayerStack or a tuple."""
    if hasattr(stack, "X") and hasattr(stack, "layers"):
        if getattr(stack, "groups", None) is None:
            raise TaskVectorError(
                "the layer stack has no groups (number pairs); task vectors need them"
            )
        meta: dict[str, Any] = {}
        attrs = getattr(stack, "attrs", None) or {}
        if attrs:
            first = next(iter(attrs.values()))
            for key in ("model", "model_revision", "n_layers", "d_model"):
                if key in first:
                    meta[key] = first[key]
        return (
            stack.X,
            list(stack.layers),
            list(stack.labels),
            list(stack.groups),
            list(stack.prompt_ids),
            meta,
        )
    if isinstance(stack, (tuple, list)) and len(stack) in (4, 5):
        X, layers, tasks, pairs = stack[:4]
        prompt_ids = list(stack[4]) if len(stack) == 5 else None
        return X, list(layers), list(tasks), None if pairs is None else list(pairs), prompt_ids, {}
    raise TaskVectorError(
        "expected a LayerStack or a tuple (X [L, n, d], layers, tasks, pairs[, prompt_ids])"
    )


@dataclass(frozen=True)
class _Stack:
    """The validated inputs of :func:`task_vectors_by_layer` (prompt order and label codes)."""

    X: np.ndarray
    layers: list
    tasks: list
    pairs: list | None
    prompt_ids: list
    meta: dict
    order: np.ndarray
    t: np.ndarray
    p: np.ndarray
    task_levels: list
    pair_levels: list


def _check_settings(n_boot: int, ci: float, between: str) -> int:
    """Reject bad settings; return ``n_boot`` as an int."""
    if between not in BETWEEN_MODES:
        raise TaskVectorError(f"between must be one of {BETWEEN_MODES}, got {between!r}")
    if not 0 < ci < 1:
        raise TaskVectorError(f"ci must be in (0, 1), got {ci}")
    if int(n_boot) < 0:
        raise TaskVectorError(f"n_boot must be >= 0, got {n_boot}")
    return int(n_boot)


def _read_stack(stack: Any, task_order: Sequence[Any] | None) -> _Stack:
    """Unpack and check ``stack``: layers, labels and prompt ids against the shape of X."""
    X, layers, tasks, pairs, prompt_ids, meta = _unpack(stack)
    X = _check_X(X, 3)
    L, n, _ = X.shape
    if len(layers) != L:
        raise TaskVectorError(f"layers: {len(layers)} entries for {L} layers in X")
    if len(set(layers)) != len(layers):
        raise TaskVectorError(f"layers: duplicates in {layers}")
    order, t, p, task_levels, pair_levels = _prepare(n, tasks, pairs, task_order)
    if prompt_ids is None:
        prompt_ids = [f"{tasks[i]}:{pairs[i] if pairs is not None else i}" for i in range(n)]
    elif len(prompt_ids) != n:
        raise TaskVectorError(f"prompt_ids: {len(prompt_ids)} entries for {n} prompts")
    return _Stack(X, layers, tasks, pairs, prompt_ids, meta, order, t, p, task_levels, pair_levels)


def _layer_row(
    s: _Stack, li: int, geo: list[dict[str, Any]], boot, *, n_boot: int, ci: float, between: str
) -> dict[str, Any]:
    """The scores row of layer index ``li`` (its geometry is ``geo[li]``, boot columns filled)."""
    g = geo[li]
    row = {
        "layer": int(s.layers[li]),
        "n_prompts": s.X.shape[1],
        "n_tasks": len(s.task_levels),
        "n_pairs": len(s.pair_levels),
        "within": g["within"],
        "between": g["between"] if between == "different_pair" else g["between_all"],
        "same_pair": g["same_pair"],
        "between_all": g["between_all"],
        "separation": g["separation"],
    }
    for name in ("separation", "within", "between"):
        lo, hi, nv = _interval(boot[name][:, li], ci) if n_boot else (np.nan, np.nan, 0)
        row[f"{name}_ci_low"], row[f"{name}_ci_high"] = lo, hi
        if name == "separation":
            row["n_boot_valid"] = nv
    row["pair_separation"] = g["pair_separation"]
    row["ratio"], row["ratio_shifted"] = g["ratio"], g["ratio_shifted"]
    if li == 0:
        row["delta_prev"] = row["delta_prev_ci_low"] = row["delta_prev_ci_high"] = float("nan")
    else:
        row["delta_prev"] = g["separation"] - geo[li - 1]["separation"]
        d = boot["separation"][:, li] - boot["separation"][:, li - 1]
        lo, hi, _ = _interval(d, ci) if n_boot else (np.nan, np.nan, 0)
        row["delta_prev_ci_low"], row["delta_prev_ci_high"] = lo, hi
    row["centred_rms"] = g["centred_rms"]
    row["n_boot"] = n_boot
    for task, norm in zip(s.task_levels, g["task_norms"]):
        row[f"norm_{task}"] = float(norm)
    return row


def _scores_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The scores table, with ``n_boot_valid`` moved next to ``n_boot``."""
    cols = list(rows[0])
    cols.remove("n_boot_valid")
    cols.insert(cols.index("n_boot") + 1, "n_boot_valid")
    return pd.DataFrame(rows)[cols]


def _layer_arrays(s: _Stack, geo: list[dict[str, Any]], boot_separation) -> dict[str, Any]:
    """The per-layer matrices of every layer, stacked, and the prompt labels in task order."""
    return {
        "layers": np.asarray(s.layers, dtype=np.int64),
        "tasks": s.task_levels,
        "prompt_ids": [str(s.prompt_ids[i]) for i in s.order],
        "prompt_tasks": geo[0]["prompt_tasks"],
        "prompt_pairs": geo[0]["prompt_pairs"],
        "order": s.order,
        "prompt_cosine": np.stack([g["prompt_cosine"] for g in geo]),
        "task_cosine": np.stack([g["task_cosine"] for g in geo]),
        "task_vectors": np.stack([g["task_vectors"] for g in geo]),
        "task_norms": np.stack([g["task_norms"] for g in geo]),
        "task_counts": geo[0]["task_counts"],
        "centred": np.stack([g["centred"] for g in geo]),
        "boot_separation": boot_separation,
        "meta": s.meta,
    }


def task_vectors_by_layer(
    stack: Any,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    ci: float = 0.95,
    between: str = "different_pair",
    task_order: Sequence[Any] | None = None,
    recentre: bool = False,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Task geometry at every layer of ``stack`` with bootstrap intervals over pairs.

    ``stack`` is a :class:`layerscope.data.h5cache.LayerStack` (labels = tasks, groups = pairs) or a
    tuple ``(X [L, n, d], layers, tasks, pairs[, prompt_ids])``.

    Returns ``(scores, arrays)``. ``scores`` has one row per layer (sorted as given) with
    ``layer, n_prompts, n_tasks, n_pairs, within, between, same_pair, between_all, separation,
    separation_ci_low, separation_ci_high, within_ci_low, within_ci_high, between_ci_low,
    between_ci_high, pair_separation, ratio, ratio_shifted, delta_prev, delta_prev_ci_low,
    delta_prev_ci_high, centred_rms, n_boot, n_boot_valid`` and ``norm_{task}`` per task.
    ``arrays`` holds ``layers`` [L], ``tasks`` [k], ``prompt_ids`` / ``prompt_tasks`` /
    ``prompt_pairs`` [n] (task-then-pair order), ``order`` [n], ``prompt_cosine`` [L, n, n],
    ``task_cosine`` [L, k, k], ``task_vectors`` [L, k, d], ``task_norms`` [L, k],
    ``centred`` [L, n, d] (centred prompt vectors, for PCA), ``boot_separation`` [n_boot, L],
    ``meta`` (model, ...) and the settings (``n_boot``, ``seed``, ``ci``, ``between``).
    """
    n_boot = _check_settings(n_boot, ci, between)
    s = _read_stack(stack, task_order)
    L, n, _ = s.X.shape
    masks = _masks(s.t, s.p)
    bkey = "between" if between == "different_pair" else "between_all"
    W = bootstrap_weights(s.p, n_boot, seed) if n_boot else np.zeros((0, n))

    rows = []
    geo: list[dict[str, Any]] = []
    boot = {name: np.full((n_boot, L), np.nan) for name in ("within", "between", "separation")}
    for li in range(L):
        g = task_geometry(s.X[li], s.tasks, s.pairs, task_order=task_order, between=between)
        geo.append(g)
        if n_boot:
            bm = _boot_means(g["centred"], W, masks, recentre=recentre)
            boot["within"][:, li] = bm["within"]
            boot["between"][:, li] = bm[bkey]
            boot["separation"][:, li] = bm["within"] - bm[bkey]
        rows.append(_layer_row(s, li, geo, boot, n_boot=n_boot, ci=ci, between=between))
    arrays = _layer_arrays(s, geo, boot["separation"])
    arrays.update(
        {
            "n_boot": n_boot,
            "seed": int(seed),
            "ci": float(ci),
            "between": between,
            "recentre": bool(recentre),
        }
    )
    return _scores_frame(rows), arrays


def best_layer(scores: pd.DataFrame) -> int:
    """Layer with the highest ``separation`` (ties -> earliest layer; NaN rows ignored)."""
    s = scores[np.isfinite(scores["separation"].to_numpy(dtype=float))]
    if s.empty:
        raise TaskVectorError("best_layer: no layer has a defined separation")
    top = s["separation"].max()
    return int(s.loc[s["separation"] == top, "layer"].min())


def norms_long(scores: pd.DataFrame) -> pd.DataFrame:
    """Long table ``layer, task, norm, rel_norm`` from the ``norm_{task}`` columns of ``scores``.

    ``rel_norm`` = norm / ``centred_rms`` (comparable across layers whose scale differs).
    """
    cols = [c for c in scores.columns if c.startswith("norm_")]
    out = scores.melt(
        id_vars=["layer", "centred_rms"], value_vars=cols, var_name="task", value_name="norm"
    )
    out["task"] = out["task"].str.slice(len("norm_"))
    out["rel_norm"] = out["norm"] / out["centred_rms"]
    order = {c[len("norm_") :]: i for i, c in enumerate(cols)}
    out = out.sort_values(["layer", "task"], key=lambda s: s.map(order) if s.name == "task" else s)
    return out[["layer", "task", "norm", "rel_norm"]].reset_index(drop=True)


def layer_arrays(arrays: Mapping[str, Any], layer: int) -> dict[str, Any]:
    """The per-layer slices of ``arrays`` (``prompt_cosine``, ``task_cosine``, ...) at ``layer``."""
    layers = [int(x) for x in arrays["layers"]]
    if int(layer) not in layers:
        raise TaskVectorError(f"layer {layer} not among {layers}")
    i = layers.index(int(layer))
    out = {
        k: arrays[k][i]
        for k in ("prompt_cosine", "task_cosine", "task_vectors", "task_norms")
        if k in arrays
    }
    if "centred" in arrays:
        out["centred"] = arrays["centred"][i]
    for k in ("tasks", "prompt_ids", "prompt_tasks", "prompt_pairs"):
        out[k] = list(arrays[k])
    return out


# --------------------------------------------------------------------------------------------
# PCA


def pca_of_prompts(
    X: Any, tasks: Sequence[Any] | None = None, *, n_components: int = 2
) -> dict[str, Any]:
    """PCA of prompt vectors ``X`` [n, d] (centred on their mean) by SVD.

    Returns ``coords`` [n, n_components], ``explained_variance_ratio`` [n_components],
    ``components`` [n_components, d], ``mean`` [d]; with ``tasks`` also ``tasks`` (names in order
    of first appearance) and ``task_coords`` [k, n_components] -- the projected task vectors
    (mean coordinates of each task's prompts). Signs are fixed so that the largest-magnitude
    loading of each component is positive (deterministic output).
    """
    X = _check_X(X, 2)
    n, d = X.shape
    if not 1 <= n_components <= min(n, d):
        raise TaskVectorError(f"n_components must be in [1, {min(n, d)}], got {n_components}")
    mean = X.mean(axis=0)
    C = X - mean
    U, s, Vt = np.linalg.svd(C, full_matrices=False)
    Vt = Vt[:n_components]
    flip = np.sign(Vt[np.arange(n_components), np.argmax(np.abs(Vt), axis=1)])
    flip[flip == 0] = 1.0
    Vt = Vt * flip[:, None]
    var = s**2
    total = var.sum()
    ratio = var[:n_components] / total if total > 0 else np.zeros(n_components)
    out: dict[str, Any] = {
        "coords": C @ Vt.T,
        "explained_variance_ratio": ratio,
        "components": Vt,
        "mean": mean,
    }
    if tasks is not None:
        if len(tasks) != n:
            raise TaskVectorError(f"tasks: {len(tasks)} entries for {n} prompts")
        codes, levels = _codes(tasks, None, "tasks")
        out["tasks"] = levels
        out["task_coords"] = np.stack(
            [out["coords"][codes == j].mean(axis=0) for j in range(len(levels))]
        )
    return out


# --------------------------------------------------------------------------------------------
# writers / reader


def write_task_vectors(
    result: tuple[pd.DataFrame, Mapping[str, Any]],
    h5_path: str | os.PathLike,
    csv_path: str | os.PathLike,
    *,
    attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write ``(scores, arrays)`` of :func:`task_vectors_by_layer`: HDF5 arrays + CSV scores.

    Each file is written to a temporary file next to it and renamed into place, so an error
    leaves no partial file. ``attrs`` (model, dataset, component, pooling, ...) go on the HDF5
    root next to ``arrays["meta"]``.
    """
    import h5py

    scores, arrays = result
    str_dt = h5py.string_dtype("utf-8")
    root = {
        **{k: v for k, v in dict(arrays.get("meta") or {}).items()},
        **dict(attrs or {}),
    }
    with atomic_path(h5_path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["kind"] = "task_vectors"
            f.attrs["format_version"] = FORMAT_VERSION
            for key in ("n_boot", "seed", "ci", "between", "recentre"):
                f.attrs[key] = arrays[key]
            for key, value in root.items():
                if value is None:
                    value = "null"
                elif isinstance(value, (list, tuple, dict)):
                    value = json.dumps(value)
                f.attrs[str(key)] = value
            for key in ("tasks", "prompt_ids", "prompt_tasks", "prompt_pairs"):
                f.create_dataset(
                    key, data=np.array([str(v) for v in arrays[key]], dtype=object), dtype=str_dt
                )
            f.create_dataset("order", data=np.asarray(arrays["order"], dtype=np.int64))
            f.create_dataset("layers", data=np.asarray(arrays["layers"], dtype=np.int64))
            f.create_dataset(
                "bootstrap/separation", data=np.asarray(arrays["boot_separation"], dtype=np.float64)
            )
            for i, layer in enumerate(arrays["layers"]):
                g = f.create_group(f"layer_{int(layer)}")
                for key in (
                    "prompt_cosine",
                    "task_cosine",
                    "task_vectors",
                    "task_norms",
                    "centred",
                ):
                    if (
                        key in arrays
                    ):  # centred prompts: the PCA figure is drawn from the file alone
                        g.create_dataset(key, data=np.asarray(arrays[key][i]))
                row = scores.loc[scores["layer"] == int(layer)]
                if len(row) == 1:
                    for key in (
                        "within",
                        "between",
                        "separation",
                        "separation_ci_low",
                        "separation_ci_high",
                    ):
                        g.attrs[key] = float(row[key].iloc[0])
            f.attrs["complete"] = True
    with atomic_path(csv_path) as tmp:
        scores.to_csv(tmp, index=False)


def read_task_vectors(h5_path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by :func:`write_task_vectors` back into an ``arrays``-like dict."""
    import h5py

    with h5py.File(h5_path, "r") as f:
        if f.attrs.get("kind") != "task_vectors" or not f.attrs.get("complete", False):
            raise TaskVectorError(f"{h5_path}: not a complete task_vectors file")
        out: dict[str, Any] = {}
        for key in ("tasks", "prompt_ids", "prompt_tasks", "prompt_pairs"):
            out[key] = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in f[key][()]]
        out["order"] = f["order"][()]
        out["layers"] = f["layers"][()]
        out["boot_separation"] = f["bootstrap/separation"][()]
        for key in ("prompt_cosine", "task_cosine", "task_vectors", "task_norms", "centred"):
            if all(key in f[f"layer_{int(L)}"] for L in out["layers"]):
                out[key] = np.stack([f[f"layer_{int(L)}/{key}"][()] for L in out["layers"]])
        attrs = {}
        for k, v in f.attrs.items():
            if isinstance(v, bytes):
                v = v.decode("utf-8")
            if isinstance(v, np.generic):
                v = v.item()
            attrs[k] = v
        out["attrs"] = attrs
    return out
