"""Probe validity: control tasks, probe families, calibration and multiple testing.

Pure functions on arrays (no files). The methods are documented in ``docs/methods.md`` ("Probe
validity"); in short:

* **Probe families** beside the logistic probe of :mod:`layerscope.analysis.probes`, both
  generative linear discriminants with a shared covariance
  ``S_lam = (1 - lam) S + lam (tr S / d) I`` (``S`` the pooled within-class covariance, ddof 0,
  as scikit-learn's LDA): class scores ``x . S_lam^-1 mu_c - mu_c . S_lam^-1 mu_c / 2 + log
  prior_c``. ``mass_mean`` is ``lam = 1`` (binary direction ``mu_1 - mu_0`` up to a positive
  scale; the score a projection onto it), ``lda`` picks ``lam`` from ``shrinkages`` by the same
  grouped inner CV as the logistic probe's C. Probabilities are the softmax of the class scores
  (the Gaussian posterior), so calibration and every metric apply unchanged. Both are scored on
  the logistic probe's outer folds.
* **Control task** (Hewitt & Liang 2019): a labelling that keeps the class frequencies and breaks
  the meaning, see :func:`control_labels`; every family is cross-validated on it with the same
  folds and the same regularisation search, and ``selectivity`` = primary metric - control primary
  metric with a paired bootstrap interval over folds and test prompts
  (:func:`paired_selectivity`).
* **Calibration** of the held-out probabilities: ECE with equal-mass bins and recall at a fixed
  false-positive rate, each with a bootstrap interval over prompts (:func:`calibration`).
* **Multiple testing**: :func:`holm` and :func:`benjamini_hochberg`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special, stats

from layerscope.analysis.probes import (
    METRICS,
    ProbeInputError,
    fold_metrics,
    make_folds,
    summarise_scores,
)

FAMILIES: tuple[str, ...] = ("logistic", "mass_mean", "lda")
_MAX_CONTROL_DRAWS = 20


# --------------------------------------------------------------------------------------
# generative linear discriminants (mass-mean, LDA)
# --------------------------------------------------------------------------------------


class _Whitener:
    """``S_lam^-1`` applied to vectors, for any shrinkage, from one decomposition of ``S``.

    ``S = Xc^T Xc / n`` (``Xc`` the rows centred on their class mean) is decomposed directly when
    ``d <= n`` and through the ``n x n`` Gram matrix otherwise (``O(n^2 d)`` rather than
    ``O(d^3)`` for wide activations, the usual case of a few hundred prompts).
    """

    def __init__(self, Xc: np.ndarray) -> None:
        n, d = Xc.shape
        if d <= n:  # narrow: decompose S itself
            ev, V = np.linalg.eigh(Xc.T @ Xc)
            keep = ev > 1e-12 * max(float(ev.max()), 1e-300)
            self.V = V[:, keep]
        else:  # wide: through the Gram matrix
            ev, U = np.linalg.eigh(Xc @ Xc.T)
            keep = ev > 1e-12 * max(float(ev.max()), 1e-300)
            self.V = (Xc.T @ U[:, keep]) / np.sqrt(ev[keep])  # (d, r) orthonormal
        self.ev = ev[keep] / n  # eigenvalues of S
        self.t = float(self.ev.sum()) / d  # tr(S) / d
        # No within-class variance at all (e.g. one row per class in an inner fold): the identity,
        # so the discriminant is the mass-mean direction itself.
        self.degenerate = not self.t > 0
        if self.degenerate:
            self.t = 1.0

    def solve(self, M: np.ndarray, lam: float) -> np.ndarray:
        """``S_lam^-1 M^T`` transposed: rows of ``M`` (q, d) mapped through the inverse."""
        if not 0.0 < lam <= 1.0:
            raise ProbeInputError(f"shrinkage must be in (0, 1], got {lam}")
        P = M @ self.V  # (q, r)
        inside = P / ((1.0 - lam) * self.ev + lam * self.t)
        outside = (M - P @ self.V.T) / (lam * self.t)
        return inside @ self.V.T + outside


def _class_stats(X: np.ndarray, codes: np.ndarray, k: int):
    """Class means (k, d), log priors (k,) and the rows centred on their class mean."""
    counts = np.bincount(codes, minlength=k).astype(np.float64)
    if (counts == 0).any():
        raise ProbeInputError("a training part lacks a class")
    means = np.zeros((k, X.shape[1]))
    np.add.at(means, codes, X)
    means /= counts[:, None]
    return means, np.log(counts / counts.sum()), X - means[codes]


def discriminant(X: Any, codes: Any, k: int, shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    """``(W, b)`` of the shrunk-covariance linear discriminant: decision ``X @ W.T + b``.

    Binary (``k == 2``): one row, the class-1 minus class-0 scores (a log-odds); else ``k`` rows.
    ``shrinkage = 1`` is the mass-mean probe: ``W = (mu_1 - mu_0) / (tr S / d)``.
    """
    X = np.asarray(X, dtype=np.float64)
    codes = np.asarray(codes, dtype=np.int64)
    means, logp, Xc = _class_stats(X, codes, k)
    return _discriminant_from(means, logp, _Whitener(Xc), shrinkage)


def _discriminant_from(means, logp, wh: _Whitener, lam: float):
    W = wh.solve(means, lam)
    b = -0.5 * np.einsum("cd,cd->c", W, means) + logp
    if means.shape[0] == 2:
        return (W[1] - W[0])[None, :], np.array([b[1] - b[0]])
    return W, b


def proba_of(X: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``predict_proba`` columns (n, k) of linear decision values ``X @ W.T + b``."""
    dec = X @ W.T + b
    if dec.shape[1] == 1:
        p = special.expit(dec[:, 0])
        return np.column_stack([1.0 - p, p])
    return special.softmax(dec, axis=1)


def _primary_of(k: int) -> str:
    return "auroc" if k == 2 else "balanced_accuracy"


def _select_shrinkage(X, codes, gcodes, k, grid, inner_splits, seed) -> tuple[float, str]:
    """Shrinkage by grouped inner CV on the primary metric (ties: the larger, i.e. stronger)."""
    grid = sorted(float(g) for g in grid)
    if len(grid) == 1:
        return grid[0], "single"
    try:
        ids = make_folds(codes, gcodes, n_splits=inner_splits, n_repeats=1, seed=seed)[0]
    except ProbeInputError:
        return grid[-1], "default"
    scores = np.full((len(grid), int(ids.max()) + 1), np.nan)
    primary = _primary_of(k)
    for f in range(scores.shape[1]):
        te = ids == f
        if np.unique(codes[~te]).size < k:
            continue
        means, logp, Xc = _class_stats(X[~te], codes[~te], k)
        wh = _Whitener(Xc)
        for i, lam in enumerate(grid):
            W, b = _discriminant_from(means, logp, wh, lam)
            scores[i, f] = fold_metrics(codes[te], proba_of(X[te], W, b), k)[primary]
    if np.all(np.isnan(scores)):
        return grid[-1], "default"
    mean = np.where(np.all(np.isnan(scores), axis=1), -np.inf, np.nanmean(scores, axis=1))
    best = int(np.flatnonzero(mean >= mean.max() - 1e-12)[-1])
    return grid[best], "inner_cv"


@dataclass
class FamilyCV:
    """One family cross-validated on given folds: fold scores, held-out probabilities, final fit."""

    family: str
    metrics: dict[str, dict[str, Any]]
    fold_scores: dict[str, list[float]]
    oof: np.ndarray  # (n_repeats, n, k)
    shrinkage: float | None
    fold_shrinkage: list[float]
    coef: np.ndarray  # (q, d) final direction(s) in activation space
    intercept: np.ndarray


def family_cv(
    X: Any,
    codes: Any,
    gcodes: Any,
    k: int,
    fold_ids: Any,
    family: str,
    *,
    shrinkages=(0.01, 0.1, 0.3, 0.6, 0.9),
    inner_splits: int = 3,
    seed: int = 0,
) -> FamilyCV:
    """Cross-validate ``mass_mean`` or ``lda`` on the outer folds ``fold_ids`` (n_repeats, n).

    ``codes``: integer labels ``0..k-1`` (binary: 1 = positive class); ``gcodes``: group ids used
    by the inner CV of ``lda``. The final probe is fitted on all rows (``lda``: shrinkage by inner
    CV on all rows).
    """
    if family not in ("mass_mean", "lda"):
        raise ProbeInputError(f"family must be mass_mean or lda, got {family!r}")
    X = np.asarray(X, dtype=np.float64)
    codes = np.asarray(codes, dtype=np.int64)
    gcodes = np.asarray(gcodes)
    ids = np.asarray(fold_ids, dtype=np.int64)
    R, n = ids.shape
    oof = np.full((R, n, k), np.nan)
    scores: dict[str, list[float]] = {m: [] for m in METRICS}
    lams, ratios = [], []
    for r in range(R):
        for f in range(int(ids[r].max()) + 1):
            te = ids[r] == f
            lam = _family_lambda(
                X[~te], codes[~te], gcodes[~te], k, family, shrinkages, inner_splits, (seed, r, f)
            )
            W, b = discriminant(X[~te], codes[~te], k, lam)
            oof[r, te] = proba_of(X[te], W, b)
            for m, v in fold_metrics(codes[te], oof[r, te], k).items():
                scores[m].append(v)
            lams.append(lam)
            ratios.append(te.sum() / (~te).sum())
    lam = _family_lambda(X, codes, gcodes, k, family, shrinkages, inner_splits, (seed, 5))
    W, b = discriminant(X, codes, k, lam)
    ratio = float(np.mean(ratios))
    metrics = {m: summarise_scores(scores[m], ratio) for m in METRICS}
    return FamilyCV(family, metrics, scores, oof, lam if family == "lda" else None, lams, W, b)


def _family_lambda(X, codes, gcodes, k, family, grid, inner_splits, seed_parts) -> float:
    if family == "mass_mean":
        return 1.0
    seed = int(np.random.SeedSequence(list(seed_parts)).generate_state(1)[0])
    return _select_shrinkage(X, codes, gcodes, k, grid, inner_splits, seed)[0]


def direction_cosines(coefs: dict[str, Any]) -> dict[str, float]:
    """Cosine between every two families' directions, ``"a~b"`` keys in ``coefs`` order.

    Multi-class rows are centred first (a common shift of every class's row changes no
    prediction), and the cosine is the mean over classes.
    """
    names = list(coefs)
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            A, B = np.atleast_2d(coefs[a]).astype(float), np.atleast_2d(coefs[b]).astype(float)
            if A.shape[0] > 1:
                A, B = A - A.mean(axis=0), B - B.mean(axis=0)
            num = (A * B).sum(axis=1)
            den = np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=1)
            out[f"{a}~{b}"] = float(np.mean(num / np.where(den > 0, den, np.nan)))
    return out


# --------------------------------------------------------------------------------------
# control task and selectivity
# --------------------------------------------------------------------------------------


def control_labels(codes: Any, gcodes: Any, fold_ids: Any, k: int, seed: int) -> np.ndarray:
    """A control labelling: class frequencies kept, meaning broken, assigned per group.

    If every group holds one label (a prompt, a pair or a template per group), the groups' labels
    are shuffled among the groups; otherwise (a subject holding a true and a counterfactual
    statement) the labels are shuffled within each group, so each group keeps its class counts.
    Either way a probe can fit the control only by memorising group-level features, not by
    reading the property. Draws are repeated (seeded) until every training part of ``fold_ids``
    holds every class; an error if none does within 20 draws.
    """
    codes = np.asarray(codes, dtype=np.int64)
    gcodes = np.asarray(gcodes)
    ids = np.asarray(fold_ids)
    _, ginv = np.unique(gcodes, return_inverse=True)
    one_label = all(np.unique(codes[ginv == g]).size == 1 for g in range(ginv.max() + 1))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 21]))
    for _ in range(_MAX_CONTROL_DRAWS):
        if one_label:
            glab = np.zeros(ginv.max() + 1, dtype=np.int64)
            glab[ginv] = codes
            new = rng.permutation(glab)[ginv]
        else:
            new = codes.copy()
            for g in range(ginv.max() + 1):
                rows = np.flatnonzero(ginv == g)
                new[rows] = codes[rows][rng.permutation(rows.size)]
        if all(
            np.unique(new[ids[r] != f]).size == k
            for r in range(ids.shape[0])
            for f in range(int(ids[r].max()) + 1)
        ):
            return new
    raise ProbeInputError("no control labelling keeps every class in every training fold")


def _weighted_primary(y: np.ndarray, proba: np.ndarray, Wt: np.ndarray, k: int) -> np.ndarray:
    """The primary metric of one fold under row weights ``Wt`` (B, m) (bootstrap counts).

    Binary: AUROC as the weighted Mann-Whitney statistic (ties 1/2). More classes: balanced
    accuracy (mean recall over the classes with weight). NaN where a needed class has no weight.
    """
    if k == 2:
        s = proba[:, 1]
        pos, neg = y == 1, y == 0
        G = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        wp, wn = Wt[:, pos], Wt[:, neg]
        num = np.einsum("bi,ij,bj->b", wp, G, wn)
        den = wp.sum(axis=1) * wn.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / den, np.nan)
    correct = (np.argmax(proba, axis=1) == y).astype(np.float64)
    rec = np.full((Wt.shape[0], k), np.nan)
    for c in range(k):
        w = Wt[:, y == c]
        tot = w.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            rec[:, c] = np.where(tot > 0, (w * correct[y == c]).sum(axis=1) / tot, np.nan)
    with np.errstate(invalid="ignore"):
        return np.nanmean(rec, axis=1) if np.isfinite(rec).any() else np.full(Wt.shape[0], np.nan)


def paired_selectivity(
    codes: Any,
    oof: Any,
    control_codes: Any,
    control_oof: Any,
    fold_ids: Any,
    k: int,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """``selectivity`` = mean over folds of (primary metric - control primary metric), the real and
    the control probe scored on the same test prompts of the same folds.

    Interval (``ci_low``, ``ci_high``): the corrected repeated k-fold t-interval (the probes'
    ``CI_METHOD``) of the paired fold differences, not clipped. The paired two-level bootstrap
    (folds resampled with replacement, then each drawn fold's test prompts, both probes scored on
    the same resampled prompts) is reported too (``boot_ci_low``, ``boot_ci_high``): it treats the
    correlated folds as independent and covered 0 in only 73 % of 30 no-signal datasets, against
    93 % for the corrected interval (docs/methods.md), so the corrected one is the headline.

    Returns ``{"value", "ci_low", "ci_high", "boot_ci_low", "boot_ci_high", "metric",
    "control_mean", "n", "n_boot"}``.
    """
    codes, cc = np.asarray(codes, np.int64), np.asarray(control_codes, np.int64)
    oof, coof, ids = np.asarray(oof, float), np.asarray(control_oof, float), np.asarray(fold_ids)
    folds = [ids[r] == f for r in range(ids.shape[0]) for f in range(int(ids[r].max()) + 1)]
    one = [np.ones((1, int(te.sum()))) for te in folds]
    rep = [_repeat_of(ids, j) for j in range(len(folds))]
    real = np.array([_weighted_primary(codes[te], oof[r][te], w, k)[0]
                     for te, w, r in zip(folds, one, rep)])  # fmt: skip
    ctrl = np.array([_weighted_primary(cc[te], coof[r][te], w, k)[0]
                     for te, w, r in zip(folds, one, rep)])  # fmt: skip
    both = np.isfinite(real) & np.isfinite(ctrl)
    out = dict(metric=_primary_of(k), n_boot=int(n_boot), n=int(both.sum()), value=None,
               ci_low=None, ci_high=None, boot_ci_low=None, boot_ci_high=None,
               control_mean=_nanmean(ctrl))  # fmt: skip
    if not both.any():
        return out
    diff = real[both] - ctrl[both]
    out["value"] = float(diff.mean())
    if diff.size > 1:
        ratio = float(np.mean([te.sum() / (~te).sum() for te in folds]))
        half = float(stats.t.ppf((1 + ci) / 2, diff.size - 1)) * math.sqrt(
            diff.var(ddof=1) * (1.0 / diff.size + ratio)
        )
        out.update(ci_low=out["value"] - half, ci_high=out["value"] + half)
    if n_boot > 0:
        boots = _selectivity_boot(codes, oof, cc, coof, ids, folds, k, n_boot, seed)
        boots = boots[np.isfinite(boots)]
        if boots.size:
            lo, hi = np.quantile(boots, [(1 - ci) / 2, (1 + ci) / 2])
            out.update(boot_ci_low=float(lo), boot_ci_high=float(hi))
    return out


def _repeat_of(ids: np.ndarray, j: int) -> int:
    """The repeat of the ``j``-th fold (repeat-major order, as the fold lists are kept)."""
    sizes = [int(row.max()) + 1 for row in ids]
    return int(np.searchsorted(np.cumsum(sizes), j, side="right"))


def _selectivity_boot(codes, oof, cc, coof, ids, folds, k, n_boot, seed) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 22]))
    J = len(folds)
    pick = rng.integers(0, J, size=(n_boot, J))
    total, count = np.zeros(n_boot), np.zeros(n_boot)
    for j, te in enumerate(folds):
        b_idx = np.nonzero(pick == j)[0]
        if b_idx.size == 0:
            continue
        m = int(te.sum())
        Wt = rng.multinomial(m, np.full(m, 1.0 / m), size=b_idx.size).astype(np.float64)
        r = _repeat_of(ids, j)
        d = _weighted_primary(codes[te], oof[r][te], Wt, k) - _weighted_primary(
            cc[te], coof[r][te], Wt, k
        )
        ok = np.isfinite(d)
        np.add.at(total, b_idx[ok], d[ok])
        np.add.at(count, b_idx[ok], 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def _nanmean(v: np.ndarray) -> float | None:
    v = np.asarray(v, float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else None


# --------------------------------------------------------------------------------------
# calibration and operating points
# --------------------------------------------------------------------------------------


def _bin_edges(n: int, n_bins: int) -> np.ndarray:
    """Start index of each equal-mass bin of ``n`` sorted values (``np.array_split`` sizes)."""
    nb = max(1, min(int(n_bins), n))
    sizes = np.full(nb, n // nb) + (np.arange(nb) < n % nb)
    return np.concatenate([[0], np.cumsum(sizes)[:-1]])


def ece_equal_mass(y: Any, p: Any, n_bins: int = 10) -> float:
    """Expected calibration error with equal-mass bins.

    Rows sorted by ``p`` (stable) are cut into ``min(n_bins, n)`` contiguous bins whose sizes
    differ by at most one (``np.array_split``); ``ECE = sum_b (n_b / n) |mean(y_b) - mean(p_b)|``.
    ``y``: 0/1 outcomes; ``p``: predicted probabilities of outcome 1.
    """
    return float(_ece_batch(np.asarray(p, float)[None], np.asarray(y, float)[None], n_bins)[0])


def _ece_batch(P: np.ndarray, Y: np.ndarray, n_bins: int) -> np.ndarray:
    """ECE of every row of ``P``, ``Y`` (B, n)."""
    order = np.argsort(P, axis=1, kind="stable")
    Ps, Ys = np.take_along_axis(P, order, 1), np.take_along_axis(Y, order, 1)
    edges = _bin_edges(P.shape[1], n_bins)
    gap = np.add.reduceat(Ys, edges, axis=1) - np.add.reduceat(Ps, edges, axis=1)
    return np.abs(gap).sum(axis=1) / P.shape[1]


def reliability_bins(y: Any, p: Any, n_bins: int = 10) -> list[dict[str, float]]:
    """The reliability diagram's points: per equal-mass bin the mean ``p``, mean ``y`` and count."""
    p, y = np.asarray(p, float), np.asarray(y, float)
    order = np.argsort(p, kind="stable")
    edges = list(_bin_edges(p.size, n_bins)) + [p.size]
    return [
        {"p_mean": float(p[order[a:b]].mean()), "y_mean": float(y[order[a:b]].mean()), "n": b - a}
        for a, b in zip(edges[:-1], edges[1:])
    ]


def recall_at_fpr(y: Any, score: Any, fpr: float) -> float:
    """Recall of the positives at a false-positive rate of at most ``fpr``.

    The threshold ``t`` is the ``(floor(fpr * N_neg) + 1)``-th highest negative score; a row is
    flagged when its score is strictly above ``t`` (so at most ``floor(fpr * N_neg)`` negatives
    are flagged, ties never help). Recall = flagged positives / positives. NaN without both classes.
    """
    return float(_recall_batch(np.asarray(score, float)[None], np.asarray(y)[None] == 1, fpr)[0])


def _recall_batch(S: np.ndarray, pos: np.ndarray, fpr: float) -> np.ndarray:
    neg_scores = np.where(pos, -np.inf, S)
    srt = -np.sort(-neg_scores, axis=1)  # descending; positives last as -inf
    n_neg = (~pos).sum(axis=1)
    n_pos = pos.sum(axis=1)
    allowed = np.floor(fpr * n_neg + 1e-9).astype(np.int64)
    thr = np.take_along_axis(srt, np.minimum(allowed, S.shape[1] - 1)[:, None], 1)[:, 0]
    flagged = ((S > thr[:, None]) & pos).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), flagged / n_pos, np.nan)


def calibration(
    codes: Any,
    oof: Any,
    k: int,
    *,
    n_bins: int = 10,
    fprs=(0.01, 0.05),
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """ECE (equal-mass bins) and recall at each FPR of held-out probabilities ``oof`` (R, n, k).

    Each repeat's held-out predictions cover every row once; a value is the mean over repeats,
    its interval a percentile bootstrap over prompts (the same resampled prompts in every repeat).
    Binary: the positive-class probability; more classes: top-label calibration (confidence =
    the largest probability, outcome = correct) and no recall at FPR (None).
    """
    codes, oof = np.asarray(codes, np.int64), np.asarray(oof, float)
    R, n, _ = oof.shape
    if k == 2:
        P, Y = oof[:, :, 1], np.broadcast_to(codes == 1, (R, n)).astype(float)
    else:
        P, Y = oof.max(axis=2), (oof.argmax(axis=2) == codes[None]).astype(float)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 23]))
    idx = rng.integers(0, n, size=(max(int(n_boot), 0), n))
    out: dict[str, Any] = {"n_bins": int(min(n_bins, n)), "n_boot": int(n_boot)}
    ece = float(np.mean(_ece_batch(P, Y, n_bins)))
    # ECE is biased upward under resampling (duplicated rows fill bins unevenly), so its interval
    # is the basic bootstrap (reflected about the estimate), clipped to [0, 1].
    out["ece"] = _with_interval(lambda Pb, Yb: _ece_batch(Pb, Yb, n_bins), P, Y, idx, ci, ece, True)
    out["reliability"] = reliability_bins(Y[0], P[0], n_bins)
    for f in fprs:
        key = f"recall_at_fpr_{f:g}"
        if k != 2:
            out[key] = {"value": None, "ci_low": None, "ci_high": None}
            continue
        point = float(np.nanmean(_recall_batch(P, Y > 0.5, f)))
        out[key] = _with_interval(
            lambda Pb, Yb, f=f: _recall_batch(Pb, Yb > 0.5, f), P, Y, idx, ci, point
        )
    out["n_negative"] = int((Y[0] < 0.5).sum()) if k == 2 else None
    return out


def _with_interval(fn, P, Y, idx, ci, point, basic=False) -> dict[str, Any]:
    """``{"value", "ci_low", "ci_high"}``: ``fn`` averaged over repeats on each resample;
    percentile interval, or the basic one ``[2 v - q_hi, 2 v - q_lo]`` when ``basic``."""
    out = {"value": point, "ci_low": None, "ci_high": None}
    if idx.shape[0] == 0:
        return out
    vals = np.mean([fn(P[r][idx], Y[r][idx]) for r in range(P.shape[0])], axis=0)
    vals = vals[np.isfinite(vals)]
    if vals.size:
        lo, hi = np.quantile(vals, [(1 - ci) / 2, (1 + ci) / 2])
        if basic:
            lo, hi = max(0.0, 2 * point - hi), min(1.0, 2 * point - lo)
        out.update(ci_low=float(lo), ci_high=float(hi))
    return out


# --------------------------------------------------------------------------------------
# multiple testing
# --------------------------------------------------------------------------------------


def _pvalues(p: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.array([math.nan if v is None else float(v) for v in p], dtype=float)
    ok = np.isfinite(p)
    if ((p[ok] < 0) | (p[ok] > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    return p, ok


def holm(p: Any) -> np.ndarray:
    """Holm step-down adjusted p-values (family-wise error); NaN/None stay NaN and are not counted.

    Sorted ascending, ``p_(i) * (m - i + 1)`` (1-based ``i``), made non-decreasing by a running
    maximum, capped at 1.
    """
    p, ok = _pvalues(p)
    out = np.full(p.shape, np.nan)
    v = p[ok]
    m = v.size
    if m:
        order = np.argsort(v, kind="stable")
        adj = np.minimum(1.0, np.maximum.accumulate(v[order] * (m - np.arange(m))))
        res = np.empty(m)
        res[order] = adj
        out[ok] = res
    return out


def benjamini_hochberg(p: Any) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false-discovery rate); NaN/None stay NaN.

    Sorted ascending, ``min_{j >= i} p_(j) m / j``, capped at 1 (what
    ``scipy.stats.false_discovery_control(method="bh")`` returns).
    """
    p, ok = _pvalues(p)
    out = np.full(p.shape, np.nan)
    v = p[ok]
    m = v.size
    if m:
        order = np.argsort(v, kind="stable")
        adj = v[order] * m / np.arange(1, m + 1)
        adj = np.minimum(1.0, np.minimum.accumulate(adj[::-1])[::-1])
        res = np.empty(m)
        res[order] = adj
        out[ok] = res
    return out


# --------------------------------------------------------------------------------------
# every check of one probe
# --------------------------------------------------------------------------------------


def _codes_of(y: Any, classes: list) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array(
        [lookup[v.item() if isinstance(v, np.generic) else v] for v in np.asarray(y)],
        dtype=np.int64,
    )


def probe_validity(
    X: Any,
    y: Any,
    groups: Any,
    result,
    *,
    families=FAMILIES,
    shrinkages=(0.01, 0.1, 0.3, 0.6, 0.9),
    control_task: bool = True,
    n_boot: int = 1000,
    n_bins: int = 10,
    fprs=(0.01, 0.05),
) -> dict[str, Any]:
    """Families, control task, selectivity, calibration and direction cosines of one probe.

    ``result``: the :class:`~layerscope.analysis.probes.ProbeResult` of the logistic probe on
    ``(X, y, groups)``; its folds, seed, inner splits and C grid are reused by every family and by
    the control task. Returns a JSON-safe dict: ``families[name]`` (metrics, fold scores, the
    final direction ``coef``/``intercept``, ``shrinkage``, ``control``, ``selectivity``,
    ``calibration``), ``cosines`` and ``control`` (the control labelling).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):  # many tiny decompositions: threads only cost here
        return _probe_validity(
            X, y, groups, result, families, shrinkages, control_task, n_boot, n_bins, fprs
        )


def _probe_validity(
    X, y, groups, result, families, shrinkages, control_task, n_boot, n_bins, fprs
) -> dict[str, Any]:
    from layerscope.analysis.probes import fit_probe

    X = np.asarray(X, dtype=np.float64)
    classes, k = list(result.classes), len(result.classes)
    codes = _codes_of(y, classes)
    gcodes = np.unique(
        np.asarray(groups if groups is not None else np.arange(len(codes))), return_inverse=True
    )[1]
    ids = np.asarray(result.fold_ids, dtype=np.int64)
    cv = dict(shrinkages=shrinkages, inner_splits=result.inner_splits, seed=result.seed)
    fits = {f: family_cv(X, codes, gcodes, k, ids, f, **cv) for f in families if f != "logistic"}
    ctrl = None
    if control_task:
        cc = control_labels(codes, gcodes, ids, k, result.seed)
        lr = fit_probe(
            X,
            cc,
            gcodes,
            n_splits=result.n_splits,
            n_repeats=result.n_repeats,
            inner_splits=result.inner_splits,
            Cs=result.Cs,
            n_permutations=0,
            n_random_directions=0,
            seed=result.seed,
            max_iter=result.max_iter,
            fold_ids=ids,
            blas_threads=None,
        )
        ctrl = {"codes": cc, "oof": {"logistic": np.asarray(lr.oof_proba)}}
        for fam in fits:
            ctrl["oof"][fam] = family_cv(X, cc, gcodes, k, ids, fam, **cv).oof
    out: dict[str, Any] = {"families": {}, "control": None}
    boot = dict(n_boot=n_boot, seed=result.seed)
    for fam in families:
        oof = np.asarray(result.oof_proba) if fam == "logistic" else fits[fam].oof
        entry = _family_entry(result, fits.get(fam))
        entry["calibration"] = calibration(codes, oof, k, n_bins=n_bins, fprs=fprs, **boot)
        if ctrl is not None:
            entry["selectivity"] = paired_selectivity(
                codes, oof, ctrl["codes"], ctrl["oof"][fam], ids, k, **boot
            )
        out["families"][fam] = entry
    out["cosines"] = direction_cosines({f: out["families"][f]["coef"] for f in families})
    if ctrl is not None:
        out["control"] = {"codes": ctrl["codes"].tolist(), "scheme": _scheme(codes, gcodes)}
    return out


def _scheme(codes: np.ndarray, gcodes: np.ndarray) -> str:
    one = all(np.unique(codes[gcodes == g]).size == 1 for g in np.unique(gcodes))
    return "groups" if one else "within_groups"


def _family_entry(result, fit: FamilyCV | None) -> dict[str, Any]:
    if fit is None:
        return {
            "coef": np.asarray(result.coef).tolist(),
            "intercept": list(result.intercept),
            "shrinkage": None,
        }
    return {
        "metrics": fit.metrics,
        "fold_scores": fit.fold_scores,
        "coef": fit.coef.tolist(),
        "intercept": fit.intercept.tolist(),
        "shrinkage": fit.shrinkage,
        "fold_shrinkage": fit.fold_shrinkage,
    }


def fpr_column(fpr: float) -> str:
    """The summary column of recall at false-positive rate ``fpr`` (0.01 -> recall_fpr_1pct)."""
    return f"recall_fpr_{100 * fpr:g}pct"


def validity_columns(entry: Mapping[str, Any], cos_logistic: float | None) -> dict[str, Any]:
    """The summary columns of one family's validity ``entry`` (primary-metric row)."""
    sel = entry.get("selectivity") or {}
    cal = entry.get("calibration") or {}
    cols = {
        "control_mean": sel.get("control_mean"),
        "selectivity": sel.get("value"),
        "selectivity_ci_low": sel.get("ci_low"),
        "selectivity_ci_high": sel.get("ci_high"),
    }
    ece = cal.get("ece") or {}
    cols.update(ece=ece.get("value"), ece_ci_low=ece.get("ci_low"), ece_ci_high=ece.get("ci_high"))
    for key, val in cal.items():
        if key.startswith("recall_at_fpr_"):
            col = fpr_column(float(key.rsplit("_", 1)[1]))
            cols.update(
                {
                    col: val["value"],
                    f"{col}_ci_low": val["ci_low"],
                    f"{col}_ci_high": val["ci_high"],
                }
            )
    cols["cos_logistic"] = cos_logistic
    return cols
