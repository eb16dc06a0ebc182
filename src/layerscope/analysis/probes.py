"""Linear probes with honest uncertainty: pure functions on arrays.

The question answered per layer is "is this label linearly readable here, and how sure
are we?", typically on small datasets (tens of examples, paired examples that must stay
together). Everything here takes arrays (``X`` of shape ``(n, d)``, labels ``y``, optional
``groups``) and returns plain results; nothing reads or writes files.

Procedure of :func:`fit_probe`
------------------------------
* Probe: ``StandardScaler -> LogisticRegression`` (lbfgs, L2; multinomial for more than two
  classes), see :func:`build_probe`.
* Outer cross-validation: :func:`make_folds` -- ``StratifiedGroupKFold`` (stratified by label,
  every group inside one fold), repeated ``n_repeats`` times with a different seeded shuffle.
  ``n_splits`` is lowered to the smallest number of groups that contain a class.
* Inner cross-validation (training fold only): a grid search over ``Cs`` with
  ``StratifiedGroupKFold(inner_splits)`` on the training rows and their groups, scored by the
  primary metric; ties go to the smallest C (strongest regularisation).
* Metrics per outer fold: accuracy, balanced accuracy, AUROC, F1; summarised over all
  folds x repeats with mean, std and a 95% interval (see "Interval" below).
* Controls: label-permutation test, random-direction control, majority/chance baselines.
* Final probe fitted on all data; its direction is returned in the original activation space.

Interval
--------
The 95% interval is the *corrected repeated k-fold t-interval* (Nadeau & Bengio 2003,
"Inference for the generalization error"; Bouckaert & Frank 2004). The ``J = n_splits *
n_repeats`` fold scores are correlated (training sets overlap, and every repeat reuses the
same examples), so the naive standard error ``s / sqrt(J)`` is far too small. The corrected
variance of the mean is ``s**2 * (1/J + n_test/n_train)`` with ``s`` the std (ddof=1) of the
fold scores and ``n_test/n_train`` the mean test/train size ratio; the interval is
``mean +- t_{0.975, J-1} * sqrt(that)``, clipped to ``[0, 1]``. It is a heuristic correction
(the true correlation between folds is unknown); in the simulations of both papers it was
close to nominal where the uncorrected interval is badly too narrow. It describes the
uncertainty of the estimated score of *this* procedure on data like this, not of one
particular fitted probe. If every fold scores the same (e.g. AUROC 1.0 everywhere) the
interval has zero width, which understates the uncertainty; ``notes`` then says so.
Folds whose metric is undefined (e.g. AUROC on a test fold that lacks a class) are left
out, and ``n`` counts the folds used.

Primary metric
--------------
AUROC for binary labels, balanced accuracy for more than two classes (recorded as
``primary_metric``). The permutation test and random-direction control use it.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import sklearn
from scipy import special, stats
from scipy.stats import rankdata
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

# (imported eagerly: BLAS/OpenMP libraries loaded *inside* a threadpool_limits block are not
# limited, and their idle worker threads then spin and slow every small fit ~10x)
from layerscope.errors import InputError

__all__ = [
    "METRICS",
    "ProbeInputError",
    "ProbeResult",
    "build_probe",
    "cross_dataset_matrix",
    "effective_n_splits",
    "fit_probe",
    "fold_metrics",
    "interpret",
    "make_folds",
    "summary_rows",
]

METRICS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "auroc", "f1")

CI_METHOD = (
    "corrected repeated k-fold t-interval (Nadeau & Bengio 2003): "
    "mean +- t(0.975, J-1) * sqrt(s^2 * (1/J + n_test/n_train)) over J correlated fold scores, "
    "clipped to [0, 1]"
)

_MAX_FOLD_ATTEMPTS = 20
# A permuted labelling's folds try fewer shuffles: with labels spread at random over the groups,
# most labellings of a many-class dataset have no grouped split whose every test part holds every
# class, and 20 failed attempts per permutation were a quarter of a 5-class probe job's time.
_PERMUTATION_FOLD_ATTEMPTS = 4


class ProbeInputError(InputError, ValueError):
    """Arrays given to a probe function cannot be used (shape, labels, groups, settings)."""


# --------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------


def _py(v: Any) -> Any:
    """numpy scalar -> plain Python scalar (labels, counts)."""
    return v.item() if isinstance(v, np.generic) else v


def _check_X(X: Any, name: str = "X") -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ProbeInputError(f"{name} must be 2-D (n_samples, n_features), got shape {X.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ProbeInputError(f"{name} is empty (shape {X.shape})")
    if not np.all(np.isfinite(X)):
        raise ProbeInputError(f"{name} contains NaN or infinite values")
    return X


def _check_labels(y: Any, n: int, name: str = "y") -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise ProbeInputError(
            f"{name} must be 1-D with {n} entries (one per row of X), got shape {y.shape}"
        )
    if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
        raise ProbeInputError(f"{name} contains NaN")
    if y.dtype.kind == "O":
        if any(v is None for v in y):
            raise ProbeInputError(f"{name} contains None")
    return y


def _check_groups(groups: Any, n: int) -> np.ndarray:
    """Groups -> integer codes 0..G-1 (None: every row is its own group)."""
    if groups is None:
        return np.arange(n)
    g = _check_labels(groups, n, "groups")
    _, codes = np.unique(g, return_inverse=True)
    return codes.astype(np.int64)


def _encode(y: np.ndarray, positive_class: Any = None) -> tuple[np.ndarray, list]:
    """Labels -> integer codes and the class list in code order.

    Classes are sorted; for binary labels the positive class is moved last, so code 1 is
    always the positive class (default: the last class in sorted order).
    """
    classes = list(np.unique(y))
    if len(classes) < 2:
        raise ProbeInputError(
            f"y has a single class ({_py(classes[0])!r}); a probe needs at least 2"
        )
    if positive_class is not None:
        if len(classes) != 2:
            raise ProbeInputError("positive_class only applies to binary labels")
        matches = [c for c in classes if c == positive_class]
        if not matches:
            raise ProbeInputError(
                f"positive_class {positive_class!r} is not one of the classes "
                f"{[_py(c) for c in classes]}"
            )
        classes = [c for c in classes if not c == positive_class] + matches
    lookup = {c: i for i, c in enumerate(classes)}
    codes = np.fromiter((lookup[v] for v in y), dtype=np.int64, count=len(y))
    return codes, [_py(c) for c in classes]


def _groups_per_class(codes: np.ndarray, gcodes: np.ndarray, k: int) -> np.ndarray:
    return np.array([np.unique(gcodes[codes == c]).size for c in range(k)], dtype=np.int64)


def effective_n_splits(y: Any, groups: Any = None, n_splits: int = 5) -> int:
    """The number of outer folds actually used: ``min(n_splits, fewest groups holding a class)``.

    Raises :class:`ProbeInputError` if some class occurs in fewer than 2 groups (then no
    split can put that class into both a training and a test fold).
    """
    y = np.asarray(y)
    gcodes = _check_groups(groups, len(y))
    codes, classes = _encode(_check_labels(y, len(y)))
    gpc = _groups_per_class(codes, gcodes, len(classes))
    if gpc.min() < 2:
        bad = {str(classes[c]): int(gpc[c]) for c in range(len(classes)) if gpc[c] < 2}
        raise ProbeInputError(
            f"every class needs examples in at least 2 groups for grouped cross-validation; "
            f"groups per class: {bad}"
        )
    if n_splits < 2:
        raise ProbeInputError(f"n_splits must be >= 2, got {n_splits}")
    return int(min(n_splits, gpc.min()))


# --------------------------------------------------------------------------------------
# folds
# --------------------------------------------------------------------------------------


def _derived_seed(*parts: int) -> int:
    """A 32-bit seed derived from integer parts (independent streams per repeat/fold/attempt)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _fold_ids_once(
    codes: np.ndarray, gcodes: np.ndarray, n_splits: int, random_state: int
) -> np.ndarray:
    fast = _sgkf_fold_ids(codes, gcodes, n_splits, random_state)
    if fast is not None:
        return fast
    return _sgkf_fold_ids_sklearn(codes, gcodes, n_splits, random_state)


def _sgkf_fold_ids(
    codes: np.ndarray, gcodes: np.ndarray, n_splits: int, random_state: int
) -> np.ndarray | None:
    """Test-fold id per row, as ``StratifiedGroupKFold(shuffle=True).split`` gives (~20x faster).

    A re-implementation of scikit-learn's ``_iter_test_indices``/``_find_best_fold``
    (greedy assignment of groups, sorted by the std of their class counts, to the fold that
    keeps the per-class distribution most even; the same RNG draws, the same floating-point
    operations and the same tie rule), vectorised over the candidate folds; scikit-learn's
    pure-Python loop costs ~8 ms per split, and the permutation test needs one per
    permutation. ``tests/test_probes.py`` checks equality with scikit-learn on many random
    group structures. Returns None where scikit-learn would raise (the caller then runs
    scikit-learn itself to raise the same error).
    """
    y = np.asarray(codes)
    _, y_inv, y_cnt = np.unique(y, return_inverse=True, return_counts=True)
    _, groups_inv, groups_cnt = np.unique(gcodes, return_inverse=True, return_counts=True)
    n_groups = len(groups_cnt)
    if np.all(n_splits > y_cnt) or n_splits > n_groups or n_splits > len(y) or len(y_cnt) < 2:
        return None
    n_classes = len(y_cnt)
    rng = np.random.RandomState(random_state)
    y_counts_per_group = np.zeros((n_groups, n_classes))
    np.add.at(y_counts_per_group, (groups_inv, y_inv), 1)
    perm = np.arange(n_groups)
    rng.shuffle(perm)
    y_counts_per_group = y_counts_per_group[perm]
    inv_perm = np.empty_like(perm)
    inv_perm[perm] = np.arange(perm.size)
    groups_inv = inv_perm[groups_inv]
    sorted_groups_idx = np.argsort(-np.std(y_counts_per_group, axis=1), kind="stable")

    y_counts_per_fold = np.zeros((n_splits, n_classes))
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    eye = np.eye(n_splits)[:, :, None]
    cnt = y_cnt.reshape(1, 1, -1)
    add_reduce = np.add.reduce
    for group_idx in sorted_groups_idx:
        g = y_counts_per_group[group_idx]
        # candidate i: the group added to fold i (adding 0.0 elsewhere is exact)
        cand = y_counts_per_fold[None, :, :] + eye * g[None, None, :]
        # np.mean(np.std(cand / cnt, axis=1), axis=1), spelled out as numpy computes it
        a = cand / cnt
        x = a - add_reduce(a, axis=1, keepdims=True) / n_splits
        evals = (
            add_reduce(np.sqrt(add_reduce(x * x, axis=1) / n_splits), axis=1) / n_classes
        ).tolist()
        sizes = add_reduce(y_counts_per_fold, axis=1).tolist()
        best, min_eval, min_size = None, math.inf, math.inf
        for i in range(n_splits):
            e = evals[i]
            close = math.isfinite(min_eval) and abs(e - min_eval) <= 1e-8 + 1e-5 * abs(
                min_eval
            )  # np.isclose
            if e < min_eval or (close and sizes[i] < min_size):
                best, min_eval, min_size = i, e, sizes[i]
        y_counts_per_fold[best] += g
        fold_of_group[group_idx] = best
    return fold_of_group[groups_inv]


def _sgkf_fold_ids_sklearn(
    codes: np.ndarray, gcodes: np.ndarray, n_splits: int, random_state: int
) -> np.ndarray:
    ids = np.full(len(codes), -1, dtype=np.int64)
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=random_state)
    with warnings.catch_warnings():
        # "least populated class has only N members": expected with grouped small data
        warnings.simplefilter("ignore", UserWarning)
        for f, (_, test) in enumerate(cv.split(np.zeros((len(codes), 1)), codes, gcodes)):
            ids[test] = f
    return ids


def _folds_ok(codes: np.ndarray, ids: np.ndarray, k: int) -> tuple[bool, bool]:
    """(every training fold has every class, every test fold has every class)."""
    train_ok = test_ok = True
    for f in range(int(ids.max()) + 1):
        te = ids == f
        if np.unique(codes[~te]).size < k:
            train_ok = False
        if np.unique(codes[te]).size < k:
            test_ok = False
    return train_ok, test_ok


def _make_fold_ids(
    codes: np.ndarray,
    gcodes: np.ndarray,
    k: int,
    n_splits: int,
    n_repeats: int,
    seed: int,
    tag: int = 0,
    attempts: int = _MAX_FOLD_ATTEMPTS,
) -> tuple[np.ndarray, list[int]]:
    """Fold ids (n_repeats, n) and the random_state used per repeat.

    The shuffle of repeat ``r`` uses ``random_state = derived(seed, tag, r, attempt)``; the
    first attempt whose folds all contain every class is kept (a later attempt is only
    needed for awkward group structures). If none does within ``attempts``, folds whose
    *test* part lacks a class are accepted (their AUROC is undefined); a *training* part
    lacking a class is an error.
    """
    out = np.empty((n_repeats, len(codes)), dtype=np.int64)
    states: list[int] = []
    for r in range(n_repeats):
        fallback = None
        for attempt in range(attempts):
            rs = _derived_seed(seed, tag, r, attempt)
            ids = _fold_ids_once(codes, gcodes, n_splits, rs)
            train_ok, test_ok = _folds_ok(codes, ids, k)
            if train_ok and test_ok:
                break
            if train_ok and fallback is None:
                fallback = (ids, rs)
        else:
            if fallback is None:
                raise ProbeInputError(
                    f"could not build {n_splits} grouped folds in which every training part "
                    "holds every class; use fewer n_splits or check the groups"
                )
            ids, rs = fallback
        out[r] = ids
        states.append(rs)
    return out, states


def make_folds(
    y: Any, groups: Any = None, *, n_splits: int = 5, n_repeats: int = 3, seed: int = 0
) -> np.ndarray:
    """Outer fold assignment used by :func:`fit_probe`: int array ``(n_repeats, n)``.

    ``out[r, i]`` is the test fold of row ``i`` in repeat ``r`` (``0 .. n_splits_eff-1``,
    with ``n_splits_eff = effective_n_splits(y, groups, n_splits)``). Folds come from
    ``StratifiedGroupKFold(shuffle=True)``: labels are stratified and each group lies in a
    single fold. ``groups=None`` treats every row as its own group.
    """
    y = np.asarray(y)
    n = len(y)
    gcodes = _check_groups(groups, n)
    codes, classes = _encode(_check_labels(y, n))
    k_eff = effective_n_splits(y, groups, n_splits)
    if n_repeats < 1:
        raise ProbeInputError(f"n_repeats must be >= 1, got {n_repeats}")
    ids, _ = _make_fold_ids(codes, gcodes, len(classes), k_eff, n_repeats, seed)
    return ids


# --------------------------------------------------------------------------------------
# probe and metrics
# --------------------------------------------------------------------------------------


def build_probe(C: float = 1.0, max_iter: int = 1000):
    """The probe pipeline: ``StandardScaler -> LogisticRegression(C, lbfgs, L2)``.

    With more than two classes lbfgs fits the multinomial (softmax) model.
    """
    return make_pipeline(
        StandardScaler(), LogisticRegression(C=float(C), solver="lbfgs", max_iter=int(max_iter))
    )


class _Fitter:
    """Fits probes, counting (not printing) convergence warnings."""

    def __init__(self, max_iter: int) -> None:
        self.max_iter = max_iter
        self.n_fits = 0
        self.n_not_converged = 0

    def fit(self, X: np.ndarray, y: np.ndarray, C: float):
        model = build_probe(C, self.max_iter)
        with (
            sklearn.config_context(assume_finite=True, skip_parameter_validation=True),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(X, y)
        self.n_fits += 1
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            self.n_not_converged += 1
        return model

    def decisions(
        self, X: np.ndarray, train: np.ndarray, Y: np.ndarray, C: np.ndarray, k: int
    ) -> np.ndarray:
        """Decision values (B, n, q) on all rows of probes fitted on each problem's training rows.

        Solved together by the exact batched Newton solver (:func:`_decision_batch`); a
        problem it does not solve (too large, or not converged) is fitted with scikit-learn.
        Every problem counts as one fit.
        """
        dec, conv = _decision_batch(X, train, Y, C, k)
        self.n_fits += int(conv.sum())
        for b in np.flatnonzero(~conv):
            Xb = X if X.ndim == 2 else X[b]
            model = self.fit(Xb[train[b]], Y[b][train[b]], float(C[b]))
            dec[b] = model.decision_function(Xb).reshape(Xb.shape[0], -1)
        return dec


# --------------------------------------------------------------------------------------
# batched exact solver for the many fixed-C fits (C selection, permutations, random directions)
# --------------------------------------------------------------------------------------

# A problem whose reduced Newton system (n_coef_rows * (r + 1) unknowns) is larger than this
# is fitted with scikit-learn instead (exact Newton would cost more than lbfgs there).
_NEWTON_MAX_DIM = 400
_NEWTON_MAX_ITER = 100
# convergence: max |gradient| of scikit-learn's scaling of the objective (divided by
# C * n_train) below this; scikit-learn's lbfgs stops at 1e-4
_NEWTON_GTOL = 1e-9
_CHUNK_ELEMS = 1 << 22  # bound on the (B, n, d) / (B, q, q) work arrays (32 MiB each)


def _standardise_batch(X: np.ndarray, train: np.ndarray) -> np.ndarray:
    """``StandardScaler`` fitted on each problem's training rows, applied to all rows.

    ``X``: (B, n, d), or (n, d) shared by all problems; ``train``: (B, n) bool. Returns
    (B, n, d) with scikit-learn's mean, std (ddof 0) and near-constant rule (std -> 1).
    """
    w = train.astype(np.float64)[:, :, None]
    cnt = w.sum(axis=1)  # (B, 1)
    Xb = X if X.ndim == 3 else X[None]
    mean = (Xb * w).sum(axis=1) / cnt
    diff = Xb - mean[:, None, :]
    var = ((diff * diff) * w).sum(axis=1) / cnt
    eps = np.finfo(np.float64).eps
    const = var <= cnt * eps * var + (cnt * mean * eps) ** 2
    scale = np.sqrt(var)
    scale[const] = 1.0
    return diff / scale[:, None, :]


def _reduced_features(Xs: np.ndarray, train: np.ndarray, r: int) -> np.ndarray:
    """Features (B, n, <= r) of an equivalent problem, for all rows.

    The L2-penalised solution lies in the span of the training rows (representer
    theorem). With the eigen-decomposition of the training Gram matrix ``Xs_tr Xs_tr^T =
    U S^2 U^T`` (top ``r`` >= rank components) and ``V = Xs_tr^T U / S``, the problem in
    ``z`` with features ``Xs V`` has the same objective (``w = V z``, ``||w|| = ||z||``) and
    the same decision values on every row. If ``d <= r`` the features are used as they are.
    """
    B, n, d = Xs.shape
    if d <= r:
        return Xs
    A = Xs @ Xs.transpose(0, 2, 1)  # (B, n, n): all rows x all rows
    m = train.astype(np.float64)
    At = A * m[:, None, :]  # columns restricted to training rows
    ev, U = np.linalg.eigh(At * m[:, :, None])
    ev, U = ev[:, -r:], U[:, :, -r:]
    s = np.sqrt(np.clip(ev, 0.0, None))
    big = s > 1e-10 * np.maximum(s[:, -1:], 1e-300)
    inv = np.where(big, 1.0 / np.where(big, s, 1.0), 0.0)  # null directions: z stays 0
    return (At @ U) * inv[:, None, :]


@dataclass(frozen=True)
class _NewtonProblem:
    """Fixed arrays of a batch of L2 logistic problems (see :func:`_newton_logreg`)."""

    Z1: np.ndarray  # (B, n, r + 1) features with a constant column for the intercept
    Yh: np.ndarray  # (B, n, q) one-hot labels (binary: the positive-class indicator)
    Cm: np.ndarray  # (B, n) C times the training mask: each row's loss weight
    scale: np.ndarray  # (B,) C times the number of training rows: gradient scale
    reg: np.ndarray  # (q, r + 1) penalty weights (0 for the intercepts)
    v: np.ndarray  # (dim,) unit common intercept shift (multinomial), else zeros
    q: int
    r1: int
    dim: int

    def objective(self, rows, th):
        """Objective and decision values (b, n, q) of problems ``rows`` at ``th``."""
        eta = self.Z1[rows] @ th.transpose(0, 2, 1)  # (b, n, q)
        if self.q == 1:
            lossi = np.logaddexp(0.0, eta[:, :, 0]) - self.Yh[rows, :, 0] * eta[:, :, 0]
        else:
            lse = special.logsumexp(eta, axis=2)
            lossi = lse - (self.Yh[rows] * eta).sum(axis=2)
        f = (self.Cm[rows] * lossi).sum(axis=1) + 0.5 * (self.reg * th * th).sum(axis=(1, 2))
        return f, eta


def _newton_problem(Z, Y, m, C, k) -> _NewtonProblem:
    """Set up the fixed arrays of :func:`_newton_logreg`'s batch of problems."""
    B, n, r = Z.shape
    q = 1 if k == 2 else k
    r1 = r + 1
    Z1 = np.concatenate([Z, np.ones((B, n, 1))], axis=2)
    if q == 1:
        Yh = (Y == 1).astype(np.float64)[:, :, None]
    else:
        Yh = (Y[:, :, None] == np.arange(k)).astype(np.float64)
    Cm = C[:, None] * m
    scale = C * m.sum(axis=1)
    reg = np.ones((q, r1))
    reg[:, -1] = 0.0
    dim = q * r1
    v = np.zeros(dim)
    if q > 1:  # the common shift of all intercepts: a null direction of the objective
        v.reshape(q, r1)[:, -1] = 1.0 / math.sqrt(q)
    return _NewtonProblem(Z1, Yh, Cm, scale, reg, v, q, r1, dim)


def _newton_direction(pb: _NewtonProblem, idx, Za, P, grad):
    """Newton step (b, q, r1) and decrement ``g . step`` of problems ``idx``."""
    q, r1, dim = pb.q, pb.r1, pb.dim
    b, n = idx.size, Za.shape[1]
    w = pb.Cm[idx]  # (b, n)
    # H = sum_i w_i (diag(P_i) - P_i P_i^T) (x) z_i z_i^T + diag(reg)
    WP = w[:, :, None] * P  # (b, n, q)
    H = np.zeros((b, q, r1, q, r1))
    for c in range(q):
        H[:, c, :, c, :] = (Za * WP[:, :, c : c + 1]).transpose(0, 2, 1) @ Za
    M = (np.sqrt(w)[:, :, None, None] * P[:, :, :, None] * Za[:, :, None, :]).reshape(b, n, dim)
    H = H.reshape(b, dim, dim) - M.transpose(0, 2, 1) @ M
    diag = np.arange(dim)
    H[:, diag, diag] += pb.reg.reshape(-1) + 1e-12 * pb.scale[idx, None] * (pb.reg.reshape(-1) == 0)
    if q > 1:
        H += pb.v[:, None] * pb.v[None, :]
    g = grad.reshape(b, dim)
    step = np.linalg.solve(H, g[:, :, None])[:, :, 0]
    dec = (g * step).sum(axis=1)
    return step.reshape(b, q, r1), dec


def _armijo_search(pb: _NewtonProblem, idx, th, step, dec, theta, f, eta) -> np.ndarray:
    """Backtrack along ``step``; store accepted points in ``theta, f, eta``; accepted mask."""
    b = idx.size
    f0 = f[idx]
    t = np.ones(b)
    accepted = np.zeros(b, dtype=bool)
    for _ls in range(40):
        todo = np.flatnonzero(~accepted)
        if todo.size == 0:
            break
        cand = th[todo] - t[todo, None, None] * step[todo]
        fc, ec = pb.objective(idx[todo], cand)
        # (near the optimum the decrease is below rounding: take the full Newton step)
        ok = (fc <= f0[todo] - 1e-4 * t[todo] * dec[todo]) | (
            dec[todo] <= 1e-13 * pb.scale[idx[todo]]
        )
        sel = idx[todo[ok]]
        theta[sel], f[sel], eta[sel] = cand[ok], fc[ok], ec[ok]
        accepted[todo[ok]] = True
        t[todo[~ok]] *= 0.5
    return accepted


def _newton_logreg(Z: np.ndarray, Y: np.ndarray, m: np.ndarray, C: np.ndarray, k: int):
    """Exact L2 logistic regression for a batch of problems, by damped Newton.

    Minimises ``C * sum_i m_i * loss_i + 0.5 * ||W||^2`` (intercepts unpenalised), the
    objective of scikit-learn's ``LogisticRegression(penalty="l2", C)``: binary (``k ==
    2``, one coefficient row, logistic loss) or multinomial (``k`` rows, softmax loss).
    ``Z`` (B, n, r) features, ``Y`` (B, n) integer labels, ``m`` (B, n) 0/1 training mask,
    ``C`` (B,). The objective is strictly convex in the coefficients (the multinomial
    intercepts are determined up to a common constant, which changes nothing), so Newton
    with Armijo backtracking converges globally, quadratically near the optimum.
    Returns (decision values (B, n, q), converged (B,)) with q = 1 (binary) or k.
    """
    pb = _newton_problem(Z, Y, m, C, k)
    B = Z.shape[0]
    theta = np.zeros((B, pb.q, pb.r1))
    f, eta = pb.objective(np.arange(B), theta)
    active = np.ones(B, dtype=bool)
    converged = np.zeros(B, dtype=bool)
    for _ in range(_NEWTON_MAX_ITER):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        Za, th, e = pb.Z1[idx], theta[idx], eta[idx]
        P = special.expit(e) if pb.q == 1 else special.softmax(e, axis=2)
        G = pb.Cm[idx][:, :, None] * (P - pb.Yh[idx])  # (b, n, q)
        grad = G.transpose(0, 2, 1) @ Za + pb.reg * th  # (b, q, r1)
        gmax = np.abs(grad).max(axis=(1, 2)) / pb.scale[idx]
        done = gmax <= _NEWTON_GTOL
        converged[idx[done]] = True
        active[idx[done]] = False
        if done.all():
            break
        keep = ~done
        idx, Za, th, P, grad, gmax = idx[keep], Za[keep], th[keep], P[keep], grad[keep], gmax[keep]
        step, dec = _newton_direction(pb, idx, Za, P, grad)
        accepted = _armijo_search(pb, idx, th, step, dec, theta, f, eta)
        if not accepted.all():  # no decrease representable: stop there
            stalled = ~accepted
            active[idx[stalled]] = False
            converged[idx[stalled]] = gmax[stalled] <= 1e-6
    return eta, converged


def _decision_batch(X: np.ndarray, train: np.ndarray, Y: np.ndarray, C: np.ndarray, k: int):
    """Decision values (B, n, q) on all rows of probes fitted on each problem's training rows.

    ``X`` (n, d) shared or (B, n, d); ``train`` (B, n) bool; ``Y`` (B, n) labels; ``C`` (B,).
    Each problem is ``StandardScaler -> LogisticRegression(C)`` fitted on its training rows,
    solved exactly (see :func:`_newton_logreg`). Returns (decision values, converged);
    problems too large for the Newton solver come back with converged False and NaN values.
    """
    B = train.shape[0]
    n, d = X.shape[-2:]
    q = 1 if k == 2 else k
    out = np.full((B, n, q), np.nan)
    conv = np.zeros(B, dtype=bool)
    if B == 0:
        return out, conv
    r = int(min(d, train.sum(axis=1).max()))
    if q * (r + 1) > _NEWTON_MAX_DIM:
        return out, conv
    per = max(n * d, q * q * (r + 1) ** 2, n * n)
    step = max(1, _CHUNK_ELEMS // per)
    for lo in range(0, B, step):
        sl = slice(lo, min(B, lo + step))
        Xc = X if X.ndim == 2 else X[sl]
        Xs = _standardise_batch(Xc, train[sl])
        Z = _reduced_features(Xs, train[sl], r)
        out[sl], conv[sl] = _newton_logreg(Z, Y[sl], train[sl].astype(np.float64), C[sl], k)
    return out, conv


def _proba_from_decision(dec: np.ndarray) -> np.ndarray:
    """``predict_proba`` columns from decision values (n, q)."""
    if dec.shape[1] == 1:
        p = special.expit(dec[:, 0])
        return np.column_stack([1.0 - p, p])
    return special.softmax(dec, axis=1)


def _auroc_binary(y01: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count 1/2); equals ``roc_auc_score`` up to rounding."""
    pos = y01 == 1
    n1 = int(pos.sum())
    n0 = y01.size - n1
    if n1 == 0 or n0 == 0:
        return math.nan
    ranks = rankdata(score, method="average")
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def fold_metrics(y_true: Any, proba: Any, k: int) -> dict[str, float]:
    """Metrics of one test fold from integer labels ``0..k-1`` and ``predict_proba`` columns.

    The prediction is the arg-max column (what ``predict`` returns). For binary labels code
    1 is the positive class: AUROC uses ``proba[:, 1]`` and F1 is the positive-class F1.
    For more classes AUROC is one-vs-rest macro and F1 is macro over all ``k`` classes.
    Balanced accuracy is the mean recall over the classes present in ``y_true``. Undefined
    values (AUROC when the fold lacks a class) are NaN; F1 of a class never true nor
    predicted is 0. Computed with numpy (scikit-learn's metric functions cost ~10 ms of
    input checking per call); the tests check equality with ``sklearn.metrics``.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    pred = np.argmax(proba, axis=1)
    true_n = np.bincount(y_true, minlength=k)
    pred_n = np.bincount(pred, minlength=k)
    tp = np.bincount(y_true[pred == y_true], minlength=k)
    present = true_n > 0
    denom = true_n + pred_n
    f1 = np.divide(2.0 * tp, denom, out=np.zeros(k), where=denom > 0)
    out = {
        "accuracy": float(np.mean(pred == y_true)),
        "balanced_accuracy": float(np.mean(tp[present] / true_n[present])),
    }
    if not present.all():
        out["auroc"] = math.nan
    elif k == 2:
        out["auroc"] = _auroc_binary(y_true, proba[:, 1])
    else:
        out["auroc"] = float(
            np.mean([_auroc_binary((y_true == c).astype(np.int64), proba[:, c]) for c in range(k)])
        )
    out["f1"] = float(f1[1]) if k == 2 else float(np.mean(f1))
    return out


def _primary(k: int) -> str:
    return "auroc" if k == 2 else "balanced_accuracy"


def _primary_score(y_true: np.ndarray, proba: np.ndarray, k: int) -> float:
    """``fold_metrics(y_true, proba, k)[_primary(k)]`` without computing the other metrics."""
    y_true = np.asarray(y_true, dtype=np.int64)
    true_n = np.bincount(y_true, minlength=k)
    if k == 2:
        return math.nan if not (true_n > 0).all() else _auroc_binary(y_true, proba[:, 1])
    pred = np.argmax(proba, axis=1)
    tp = np.bincount(y_true[pred == y_true], minlength=k)
    present = true_n > 0
    return float(np.mean(tp[present] / true_n[present]))


def _default_C(Cs: Sequence[float]) -> float:
    """C used when inner CV is impossible: 1.0 if in the grid, else the grid's geometric middle."""
    if any(c == 1.0 for c in Cs):
        return 1.0
    return float(Cs[len(Cs) // 2])


def _select_C(
    X: np.ndarray,
    codes: np.ndarray,
    gcodes: np.ndarray,
    k: int,
    Cs: Sequence[float],
    inner_splits: int,
    seed_parts: tuple[int, ...],
    fitter: _Fitter,
) -> tuple[float, str]:
    """Grid search over ``Cs`` by grouped, stratified inner CV on (X, codes) only.

    Returns (C, source) with source ``"inner_cv"``, ``"single"`` (one-element grid) or
    ``"default"`` (some class has < 2 groups here, so no inner CV is possible).
    """
    return _select_C_many(
        X, codes, gcodes, k, Cs, inner_splits, [(np.arange(len(codes)), seed_parts)], fitter
    )[0]


def _select_C_many(
    X: np.ndarray,
    codes: np.ndarray,
    gcodes: np.ndarray,
    k: int,
    Cs: Sequence[float],
    inner_splits: int,
    tasks: Sequence[tuple[np.ndarray, tuple[int, ...]]],
    fitter: _Fitter,
) -> list[tuple[float, str]]:
    """:func:`_select_C` on the rows ``rows`` of each task ``(rows, seed_parts)``.

    All (task, inner fold, C) fits are solved together by the batched exact solver.
    """
    results: list[tuple[float, str] | None] = [None] * len(tasks)
    scores: dict[int, np.ndarray] = {}
    jobs = []  # (task, C index, inner fold, test rows)
    train_masks = []
    n = len(codes)
    for t, (rows, seed_parts) in enumerate(tasks):
        rows = np.asarray(rows)
        c, g = codes[rows], gcodes[rows]
        if len(Cs) == 1:
            results[t] = (float(Cs[0]), "single")
            continue
        gpc = _groups_per_class(c, g, k)
        if gpc.size < k or gpc.min() < 2:
            results[t] = (_default_C(Cs), "default")
            continue
        n_inner = int(min(inner_splits, gpc.min()))
        ids, _ = _make_fold_ids(c, g, k, n_inner, 1, _derived_seed(*seed_parts), tag=1)
        ids = ids[0]
        scores[t] = np.full((len(Cs), n_inner), np.nan)
        for f in range(n_inner):
            te = ids == f
            tr = ~te
            if np.unique(c[tr]).size < k or np.unique(c[te]).size < k:
                continue
            mask = np.zeros(n, dtype=bool)
            mask[rows[tr]] = True
            for i in range(len(Cs)):
                jobs.append((t, i, f, rows[te]))
                train_masks.append(mask)
    if jobs:
        train = np.asarray(train_masks)
        Cvec = np.array([float(Cs[i]) for _, i, _, _ in jobs])
        dec = fitter.decisions(X, train, np.broadcast_to(codes, train.shape), Cvec, k)
        for j, (t, i, f, te_rows) in enumerate(jobs):
            proba = _proba_from_decision(dec[j][te_rows])
            scores[t][i, f] = _primary_score(codes[te_rows], proba, k)
    for t, sc in scores.items():
        if np.all(np.isnan(sc)):
            results[t] = (_default_C(Cs), "default")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(sc, axis=1)
        mean = np.where(np.isnan(mean), -np.inf, mean)
        best = int(
            np.flatnonzero(mean >= mean.max() - 1e-12)[0]
        )  # Cs ascending: smallest C wins ties
        results[t] = (float(Cs[best]), "inner_cv")
    return results  # type: ignore[return-value]


def _cv_fixed_C_many(
    X: np.ndarray,
    labellings: Sequence[tuple[np.ndarray, np.ndarray] | None],
    k: int,
    C: float,
    fitter: _Fitter,
) -> list[float]:
    """Per labelling ``(codes, ids)``: mean primary metric over the folds ``ids`` (1-D) at fixed C.

    ``X`` is (n, d), shared by all labellings, or (J, n, d), one per labelling. ``None``
    entries give NaN. Undefined fold scores are left out of the mean (NaN if none is left).
    All fold fits are solved together by the batched exact solver.
    """
    jobs = []  # (labelling, test mask)
    masks, labels = [], []
    for j, lab in enumerate(labellings):
        if lab is None:
            continue
        c, ids = lab
        for f in range(int(ids.max()) + 1):
            te = ids == f
            jobs.append((j, te))
            masks.append(~te)
            labels.append(c)
    vals: list[list[float]] = [[] for _ in labellings]
    if jobs:
        train = np.asarray(masks)
        Xj = X if X.ndim == 2 else X[[j for j, _ in jobs]]
        dec = fitter.decisions(Xj, train, np.asarray(labels), np.full(len(jobs), float(C)), k)
        for b, (j, te) in enumerate(jobs):
            c = labels[b]
            vals[j].append(_primary_score(c[te], _proba_from_decision(dec[b][te]), k))
    out = []
    for j, lab in enumerate(labellings):
        v = np.asarray(vals[j], dtype=np.float64)
        v = v[np.isfinite(v)]
        out.append(float(v.mean()) if (lab is not None and v.size) else math.nan)
    return out


# --------------------------------------------------------------------------------------
# summaries, baselines
# --------------------------------------------------------------------------------------


def _summarise(values: Sequence[float], test_train_ratio: float) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    mean = float(v.mean())
    if n < 2:
        return {"mean": mean, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": n}
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * math.sqrt(std**2 * (1.0 / n + test_train_ratio))
    return {
        "mean": mean,
        "std": std,
        "ci_low": float(max(0.0, mean - half)),
        "ci_high": float(min(1.0, mean + half)),
        "n": n,
    }


def summarise_scores(values: Sequence[float], test_train_ratio: float) -> dict[str, Any]:
    """Mean, std and the corrected repeated k-fold interval (``CI_METHOD``) of fold scores."""
    return _summarise(values, test_train_ratio)


def baselines(codes: Any, k: int) -> tuple[dict[str, float], dict[str, float]]:
    """(majority, chance) scores per metric of integer labels ``0..k-1`` (see the summary)."""
    return _baselines(np.asarray(codes, dtype=np.int64), k)


def _baselines(codes: np.ndarray, k: int) -> tuple[dict[str, float], dict[str, float]]:
    """(majority, chance) scores per metric, from the overall class frequencies.

    majority: always predict the most frequent class (constant scores -> AUROC 0.5).
    chance: predict a random class drawn from the class frequencies, ignoring X
    (expected accuracy sum p_c^2, balanced accuracy 1/k, AUROC 0.5, binary F1 = p_pos,
    macro F1 = 1/k).
    """
    p = np.bincount(codes, minlength=k) / len(codes)
    m = int(np.argmax(p))
    if k == 2:
        f1_major = 2 * p[1] / (1 + p[1]) if m == 1 else 0.0
        f1_chance = float(p[1])
    else:
        f1_major = 2 * p[m] / (1 + p[m]) / k
        f1_chance = 1.0 / k
    majority = {
        "accuracy": float(p[m]),
        "balanced_accuracy": 1.0 / k,
        "auroc": 0.5,
        "f1": float(f1_major),
    }
    chance = {
        "accuracy": float(np.sum(p**2)),
        "balanced_accuracy": 1.0 / k,
        "auroc": 0.5,
        "f1": f1_chance,
    }
    return majority, chance


def jsonable(obj: Any) -> Any:
    """``obj`` made JSON-safe: numpy -> Python, NaN/inf -> None, tuples -> lists, keys -> str."""
    return _jsonable(obj)


def _jsonable(obj: Any) -> Any:
    """Recursively: numpy -> Python, NaN/inf -> None, tuples -> lists, keys -> str."""
    if isinstance(obj, dict):
        return {str(_py(k)): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    obj = _py(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@dataclass
class ProbeResult:
    """Everything :func:`fit_probe` found. ``to_dict()`` is JSON-safe (NaN -> None).

    Fold-level lists (``fold_scores[metric]``, ``fold_C``, ``fold_C_source``) are ordered
    repeat-major: entry ``r * n_splits + f`` is fold ``f`` of repeat ``r``; ``fold_ids[r][i]``
    is the test fold of row ``i`` in repeat ``r``.

    The final probe satisfies ``X @ np.array(coef).T + intercept == decision_function(X)``
    in the original activation space. Binary: one row, scoring ``classes[1]`` (= the
    positive class). Multi-class: one row per class in ``classes`` order.
    """

    classes: list
    positive_class: Any
    primary_metric: str
    n_samples: int
    n_features: int
    n_groups: int
    n_per_class: dict[str, int]
    n_groups_per_class: dict[str, int]
    seed: int
    Cs: list[float]
    max_iter: int
    n_splits_requested: int
    n_splits: int
    n_repeats: int
    inner_splits: int
    fold_ids: list[list[int]]
    folds_sha256: str
    fold_random_states: list[int]
    fold_C: list[float]
    fold_C_source: list[str]
    fold_scores: dict[str, list[float]]
    metrics: dict[str, dict[str, Any]]
    ci_method: str
    majority: dict[str, float]
    chance: dict[str, float]
    permutation: dict[str, Any]
    random_directions: dict[str, Any]
    C: float
    C_source: str
    coef: list[list[float]]
    intercept: list[float]
    n_fits: int
    n_not_converged: int
    notes: list[str] = field(default_factory=list)
    #: held-out ``predict_proba`` (n_repeats, n, k): row ``i`` of repeat ``r`` from the probe of
    #: the fold that left it out (calibration and the selectivity bootstrap read it)
    oof_proba: list = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    def decision_function(self, X: Any) -> np.ndarray:
        """``X @ coef.T + intercept`` in activation space (shape (n,) binary, (n, k) otherwise)."""
        s = np.asarray(X, dtype=np.float64) @ np.asarray(self.coef).T + np.asarray(self.intercept)
        return s[:, 0] if s.shape[1] == 1 else s


# --------------------------------------------------------------------------------------
# fit_probe
# --------------------------------------------------------------------------------------


def _check_settings(
    n_splits: int,
    n_repeats: int,
    inner_splits: int,
    Cs: Sequence[float],
    n_permutations: int,
    n_random_directions: int,
) -> list[float]:
    if n_splits < 2:
        raise ProbeInputError(f"n_splits must be >= 2, got {n_splits}")
    if n_repeats < 1:
        raise ProbeInputError(f"n_repeats must be >= 1, got {n_repeats}")
    if inner_splits < 2:
        raise ProbeInputError(f"inner_splits must be >= 2, got {inner_splits}")
    if n_permutations < 0 or n_random_directions < 0:
        raise ProbeInputError("n_permutations and n_random_directions must be >= 0")
    Cs = sorted(float(c) for c in Cs)
    if not Cs or any(not (c > 0 and math.isfinite(c)) for c in Cs):
        raise ProbeInputError(f"Cs must be a non-empty list of positive numbers, got {Cs}")
    return Cs


def fit_probe(
    X: Any,
    y: Any,
    groups: Any = None,
    *,
    n_splits: int = 5,
    n_repeats: int = 3,
    inner_splits: int = 3,
    Cs: Sequence[float] = (0.001, 0.01, 0.1, 1, 10, 100),
    n_permutations: int = 100,
    n_random_directions: int = 20,
    seed: int = 0,
    max_iter: int = 1000,
    positive_class: Any = None,
    permutation_level: float = 0.05,
    blas_threads: int | None = 1,
    stream: Sequence[int] = (),
    fold_ids: Any = None,
) -> ProbeResult:
    """Cross-validated linear probe of ``y`` from ``X`` with intervals and controls.

    Parameters
    ----------
    X : (n, d) activations. y : (n,) labels (any sortable type). groups : (n,) group ids
        (rows of a group always share a fold), or None for one group per row.
    n_splits, n_repeats : outer ``StratifiedGroupKFold``; ``n_splits`` is lowered to the
        fewest groups holding a class (recorded as ``n_splits`` vs ``n_splits_requested``);
        a class in fewer than 2 groups is an error. Repeat ``r`` shuffles with a
        ``random_state`` derived from ``(seed, r)`` (see ``fold_random_states``).
    inner_splits, Cs : grid search of C by grouped stratified CV inside each training fold
        (scored by the primary metric; ties -> smallest C). If a training fold has a class
        in fewer than 2 groups, inner CV is impossible and C = 1.0 (or the grid's middle)
        is used, recorded in ``fold_C_source``.
    n_permutations : label-permutation test of the primary metric (0 to skip): the most
        permutations drawn. They are drawn in batches of ``PERMUTATION_BATCH`` and stop early once
        the p-value is clearly on one side of ``permutation_level`` (see :func:`_permutation_test`);
        ``permutation["mc_se"]`` is the Monte-Carlo standard error of the p-value. To keep the
        cost down each permutation runs ONE repeat of outer CV with a FIXED C, the C most
        often chosen by the inner CV (ties -> smaller C). The observed statistic is computed
        the same way on the true labels (``permutation["observed"]``; it can differ slightly
        from ``metrics[primary]["mean"]``, which uses all repeats and nested C selection).
        If every group has a single label, labels are permuted between groups (the group
        structure is kept; ``scheme="groups"``), else between rows (``scheme="rows"``,
        only exact when rows within a group are exchangeable). Folds are rebuilt for each
        permuted labelling with repeat 0's seed. ``p = (1 + #{perm >= observed}) / (1 + n)`` over
        the ``n`` permutations drawn.
    stream : more seed material for the permutation stream (the workflow passes the layer and the
        component and pooling indices), so that probes of different layers get independent
        permutations rather than one stream reused at every layer.
    n_random_directions : control: ``X`` projected on that many random unit directions
        (seeded, Gaussian), each scored by a 1-D probe (same fixed C, repeat-0 folds);
        reports mean and 95th percentile of the primary metric. If arbitrary directions
        already read the label well, the signal is broad rather than direction-specific;
        compare the probe's score with ``random_directions["p95"]``.
    positive_class : binary only; default the last class in sorted order.
    blas_threads : BLAS/OpenMP threads while fitting (1 avoids heavy oversubscription for
        the many tiny fits here; None leaves the libraries' defaults).
    fold_ids : optional (n_repeats, n) outer test-fold ids to use instead of building them (the
        control task reuses the real labelling's folds, see :mod:`layerscope.analysis.validity`);
        every training part must hold every class.

    Returns
    -------
    ProbeResult; the interval method is documented in the module docstring and recorded as
    ``ci_method``. The result is deterministic for given inputs and ``seed``.
    """
    Cs = _check_settings(n_splits, n_repeats, inner_splits, Cs, n_permutations, n_random_directions)
    data, notes = _probe_data(X, y, groups, positive_class, n_splits)
    given = None
    if fold_ids is not None:
        given = _check_given_folds(fold_ids, data, n_repeats)
        data = replace(data, k_eff=int(given.max()) + 1)
    if not 0 < permutation_level < 1:
        raise ProbeInputError(f"permutation_level must be in (0, 1), got {permutation_level}")
    cfg = _ProbeSettings(
        n_splits, n_repeats, inner_splits, Cs, n_permutations, n_random_directions, seed, max_iter
    )
    with _blas_limits(blas_threads):
        return _fit_probe(
            data, cfg, notes, tuple(int(x) for x in stream), given, level=permutation_level
        )


def _check_given_folds(fold_ids: Any, data: _ProbeData, n_repeats: int) -> np.ndarray:
    """Given outer folds as an int array (n_repeats, n) whose training parts hold every class."""
    ids = np.asarray(fold_ids, dtype=np.int64)
    if ids.shape != (n_repeats, data.X.shape[0]) or ids.min() < 0:
        raise ProbeInputError(
            f"fold_ids must be non-negative with shape ({n_repeats}, {data.X.shape[0]}), "
            f"got {ids.shape}"
        )
    for r in range(n_repeats):
        if not _folds_ok(data.codes, ids[r], data.k)[0]:
            raise ProbeInputError(f"fold_ids: a training part of repeat {r} lacks a class")
    return ids


def _blas_limits(blas_threads: int | None):
    """Context limiting BLAS/OpenMP to ``blas_threads`` threads (None: no limit)."""
    if blas_threads is None:
        return nullcontext()
    return threadpool_limits(limits=int(blas_threads))


@dataclass(frozen=True)
class _ProbeData:
    """Checked and encoded inputs of one probe."""

    X: np.ndarray
    codes: np.ndarray
    gcodes: np.ndarray
    classes: list
    k: int
    primary: str
    k_eff: int


@dataclass(frozen=True)
class _ProbeSettings:
    """Checked cross-validation and control settings of one probe."""

    n_splits: int
    n_repeats: int
    inner_splits: int
    Cs: list[float]
    n_permutations: int
    n_random_directions: int
    seed: int
    max_iter: int


def _probe_data(X, y, groups, positive_class, n_splits) -> tuple[_ProbeData, list[str]]:
    """Check and encode the inputs; the effective number of splits and a note if lowered."""
    X = _check_X(X)
    n, d = X.shape
    y = _check_labels(y, n)
    gcodes = _check_groups(groups, n)
    codes, classes = _encode(y, positive_class)
    k = len(classes)
    primary = _primary(k)
    k_eff = effective_n_splits(y, gcodes, n_splits)
    notes: list[str] = []
    if k_eff < n_splits:
        notes.append(
            f"n_splits lowered from {n_splits} to {k_eff}: a class occurs in only {k_eff} groups"
        )
    return _ProbeData(X, codes, gcodes, classes, k, primary, k_eff), notes


#: Permutations are drawn in batches of this size (one batched solve each) ...
PERMUTATION_BATCH = 100
#: ... and stop once the p-value's distance from the decision level (``permutation_level``: the
#: workflow passes alpha / the most tests its correction can hold, so that a clearly significant
#: probe can pass the Holm correction) exceeds PERMUTATION_Z Monte-Carlo standard errors: the
#: decision at that level is then settled, and only borderline p-values pay for many permutations
#: (up to n_permutations).
#: fit_probe's default decision level (a single test at 0.05).
PERMUTATION_ALPHA = 0.05
PERMUTATION_Z = 3.0


def permutation_p(hits: int, n: int) -> tuple[float, float]:
    """``(p, mc_se)``: the permutation p-value ``(1 + hits) / (1 + n)`` and its Monte-Carlo
    standard error ``sqrt(p (1 - p) / (n + 1))``."""
    p = (1 + hits) / (1 + n)
    return p, math.sqrt(p * (1 - p) / (n + 1))


def _permuted_labellings(codes, gcodes, k, k_eff, seed, rng, count):
    """``count`` permuted labellings with their folds (None where no valid CV exists)."""
    one_label = all(np.unique(codes[gcodes == g]).size == 1 for g in np.unique(gcodes))
    uniq = np.unique(gcodes)
    glabel = np.zeros(int(gcodes.max()) + 1, dtype=np.int64)
    for g in uniq:
        glabel[g] = codes[gcodes == g][0]
    out: list[tuple[np.ndarray, np.ndarray] | None] = []
    for _ in range(count):
        if one_label:
            new = glabel.copy()
            new[uniq] = glabel[uniq][rng.permutation(uniq.size)]
            pc = new[gcodes]
        else:
            pc = codes[rng.permutation(codes.size)]
        try:
            kp = effective_n_splits(pc, gcodes, k_eff)
            pids, _ = _make_fold_ids(
                pc, gcodes, k, kp, 1, seed, attempts=_PERMUTATION_FOLD_ATTEMPTS
            )
        except ProbeInputError:  # row permutation left a class in < 2 groups: no valid CV
            out.append(None)
            continue
        out.append((pc, pids[0]))
    return out, ("groups" if one_label else "rows")


def _permutation_test(
    X,
    codes,
    gcodes,
    k,
    k_eff,
    fold_ids,
    C_fixed,
    fitter,
    *,
    primary,
    n_permutations,
    seed,
    stream,
    level=0.05,
) -> dict[str, Any]:
    """Sequential label-permutation test of the primary metric (see ``fit_probe``'s docstring)."""
    perm: dict[str, Any] = {
        "metric": primary,
        "scheme": None,
        "n_permutations": int(n_permutations),
        "n_drawn": 0,
        "C": C_fixed,
        "n_repeats": 1,
        "observed": None,
        "scores": [],
        "p_value": None,
        "mc_se": None,
        "stopped_early": False,
        "level": float(level),
    }
    if n_permutations <= 0:
        perm["scheme"] = _permuted_labellings(codes, gcodes, k, k_eff, seed, None, 0)[1]
        return perm
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3, *stream]))
    observed = None
    scores: list[float] = []
    while len(scores) < n_permutations:
        batch, perm["scheme"] = _permuted_labellings(
            codes, gcodes, k, k_eff, seed, rng, min(PERMUTATION_BATCH, n_permutations - len(scores))
        )
        if observed is None:  # the observed statistic solved with the first batch's fits
            observed, *new = _cv_fixed_C_many(X, [(codes, fold_ids[0]), *batch], k, C_fixed, fitter)
        else:
            new = _cv_fixed_C_many(X, batch, k, C_fixed, fitter)
        scores += list(new)
        # NaN permutation scores (undefined metric) count as >= observed: conservative
        hits = (
            int(np.sum(~(np.asarray(scores) < observed)))
            if math.isfinite(observed)
            else len(scores)
        )
        p, se = permutation_p(hits, len(scores))
        if len(scores) < n_permutations and abs(p - level) > PERMUTATION_Z * se:
            perm["stopped_early"] = True
            break
    perm.update(observed=observed, scores=scores, n_drawn=len(scores), p_value=p, mc_se=se)
    return perm


@dataclass(frozen=True)
class _OuterCV:
    """Scores and chosen C of every outer fold, and their summaries."""

    scores: dict[str, list[float]]
    fold_C: list[float]
    fold_src: list[str]
    metrics: dict[str, dict[str, Any]]
    oof: np.ndarray  # (n_repeats, n, k) held-out predict_proba of every row in every repeat


def _fit_probe(
    data: _ProbeData, cfg: _ProbeSettings, notes: list[str], stream, given_folds=None, level=0.05
) -> ProbeResult:
    """Run :func:`fit_probe`'s steps on checked inputs: CV, controls, final probe."""
    fitter = _Fitter(cfg.max_iter)
    if given_folds is None:
        fold_ids, states = _make_fold_ids(
            data.codes, data.gcodes, data.k, data.k_eff, cfg.n_repeats, cfg.seed
        )
    else:
        fold_ids, states = given_folds, [-1] * given_folds.shape[0]
    for r in range(cfg.n_repeats):
        if not _folds_ok(data.codes, fold_ids[r], data.k)[1]:
            notes.append(
                f"repeat {r}: a test fold lacks a class; its AUROC is undefined and left out"
            )
    chosen = _choose_Cs(data, cfg, fold_ids, fitter)
    cv = _outer_cv(data, cfg, fold_ids, chosen, fitter)
    primary = data.primary
    if cv.metrics[primary]["std"] == 0.0:
        notes.append(
            f"every fold scored {primary} = {cv.metrics[primary]['mean']:.4g}: the t-interval has "
            f"zero width and understates the uncertainty of so few test examples"
        )
    # fixed C for the controls: the most often chosen one (ties -> smaller C)
    counts = Counter(cv.fold_C)
    C_fixed = min(counts, key=lambda c: (-counts[c], c))
    perm = _permutation_test(
        data.X,
        data.codes,
        data.gcodes,
        data.k,
        data.k_eff,
        fold_ids,
        C_fixed,
        fitter,
        primary=primary,
        n_permutations=cfg.n_permutations,
        seed=cfg.seed,
        stream=stream,
        level=level,
    )
    rand = _random_direction_control(data, cfg, fold_ids[0], C_fixed, fitter)
    C_final, C_src = chosen[-1]
    W, b = _final_direction(data, C_final, fitter)
    if fitter.n_not_converged:
        notes.append(
            f"{fitter.n_not_converged} of {fitter.n_fits} fits hit max_iter={cfg.max_iter} "
            "without converging"
        )
    final = {"C": C_final, "C_source": C_src, "coef": W.tolist(), "intercept": b.tolist()}
    return _probe_result(data, cfg, fold_ids, states, cv, perm, rand, final, fitter, notes)


def _choose_Cs(data: _ProbeData, cfg: _ProbeSettings, fold_ids, fitter) -> list[tuple[float, str]]:
    """(C, source) for every outer fold (repeat-major) and, last, for the final probe."""
    # C selection for every outer fold and for the final probe, solved in one batch
    tasks = [
        (np.flatnonzero(fold_ids[r] != f), (cfg.seed, 2, r, f))
        for r in range(cfg.n_repeats)
        for f in range(data.k_eff)
    ]
    tasks.append((np.arange(data.X.shape[0]), (cfg.seed, 5)))
    return _select_C_many(
        data.X, data.codes, data.gcodes, data.k, cfg.Cs, cfg.inner_splits, tasks, fitter
    )


def _outer_cv(data: _ProbeData, cfg: _ProbeSettings, fold_ids, chosen, fitter) -> _OuterCV:
    """Score every outer fold's probe (its C from the nested selection) and summarise."""
    X, codes, k = data.X, data.codes, data.k
    scores: dict[str, list[float]] = {m: [] for m in METRICS}
    fold_C: list[float] = []
    fold_src: list[str] = []
    ratios: list[float] = []
    oof = np.full((cfg.n_repeats, X.shape[0], k), np.nan)
    for r in range(cfg.n_repeats):
        for f in range(data.k_eff):
            te = fold_ids[r] == f
            tr = ~te
            C, src = chosen[r * data.k_eff + f]
            model = fitter.fit(X[tr], codes[tr], C)
            oof[r, te] = model.predict_proba(X[te])
            fm = fold_metrics(codes[te], oof[r, te], k)
            for m in METRICS:
                scores[m].append(fm[m])
            fold_C.append(C)
            fold_src.append(src)
            ratios.append(te.sum() / tr.sum())
    ratio = float(np.mean(ratios))
    metrics = {m: _summarise(scores[m], ratio) for m in METRICS}
    return _OuterCV(scores, fold_C, fold_src, metrics, oof)


def _random_direction_control(
    data: _ProbeData, cfg: _ProbeSettings, folds0, C_fixed, fitter
) -> dict[str, Any]:
    """Score 1-D probes on random unit directions of ``X`` (repeat-0 folds, fixed C)."""
    n_dirs = cfg.n_random_directions
    rand: dict[str, Any] = {
        "n": int(n_dirs),
        "metric": data.primary,
        "C": C_fixed,
        "scores": [],
        "mean": None,
        "p95": None,
    }
    if n_dirs > 0:
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 4]))
        U = rng.standard_normal((data.X.shape[1], n_dirs))
        U /= np.linalg.norm(U, axis=0, keepdims=True)
        P = data.X @ U
        rs = _cv_fixed_C_many(
            P.T[:, :, None], [(data.codes, folds0)] * n_dirs, data.k, C_fixed, fitter
        )
        arr = np.asarray(rs)
        fin = arr[np.isfinite(arr)]
        rand.update(
            scores=rs,
            mean=float(fin.mean()) if fin.size else None,
            p95=float(np.percentile(fin, 95)) if fin.size else None,
        )
    return rand


def _final_direction(data: _ProbeData, C_final: float, fitter) -> tuple[np.ndarray, np.ndarray]:
    """Fit the final probe on all data: its (coef, intercept) in the original space."""
    final = fitter.fit(data.X, data.codes, C_final)
    scaler, lr = final[0], final[-1]
    W = lr.coef_ / scaler.scale_[None, :]
    b = lr.intercept_ - W @ scaler.mean_
    return W, b


def _probe_result(data, cfg, fold_ids, states, cv, perm, rand, final, fitter, notes) -> ProbeResult:
    """Assemble the :class:`ProbeResult` of the steps' outputs."""
    codes, gcodes, classes, k = data.codes, data.gcodes, data.classes, data.k
    n, d = data.X.shape
    majority, chance = _baselines(codes, k)
    ids_list = fold_ids.tolist()
    sha = hashlib.sha256(json.dumps(ids_list, separators=(",", ":")).encode()).hexdigest()
    n_per_class = {str(classes[c]): int(np.sum(codes == c)) for c in range(k)}
    gpc = _groups_per_class(codes, gcodes, k)
    return ProbeResult(
        classes=classes,
        positive_class=classes[1] if k == 2 else None,
        primary_metric=data.primary,
        n_samples=int(n),
        n_features=int(d),
        n_groups=int(np.unique(gcodes).size),
        n_per_class=n_per_class,
        n_groups_per_class={str(classes[c]): int(gpc[c]) for c in range(k)},
        seed=int(cfg.seed),
        Cs=list(cfg.Cs),
        max_iter=int(cfg.max_iter),
        n_splits_requested=int(cfg.n_splits),
        n_splits=int(data.k_eff),
        n_repeats=int(cfg.n_repeats),
        inner_splits=int(cfg.inner_splits),
        fold_ids=ids_list,
        folds_sha256=sha,
        fold_random_states=[int(s) for s in states],
        fold_C=cv.fold_C,
        fold_C_source=cv.fold_src,
        fold_scores=cv.scores,
        metrics=cv.metrics,
        ci_method=CI_METHOD,
        majority=majority,
        chance=chance,
        permutation=perm,
        random_directions=rand,
        **final,
        n_fits=fitter.n_fits,
        n_not_converged=fitter.n_not_converged,
        notes=notes,
        oof_proba=cv.oof.tolist(),
    )


# --------------------------------------------------------------------------------------
# interpretation and tidy rows
# --------------------------------------------------------------------------------------


def interpret(
    ci_low: float,
    ci_high: float,
    thresholds: tuple[float, float] = (0.55, 0.65),
    *,
    chance: float = 0.5,
) -> str:
    """Verbal reading of a 95% interval (never of the mean alone).

    ``thresholds = (weak, strong)`` are stated on a scale where chance is 0.5 (AUROC,
    binary balanced accuracy); for a metric whose chance level is ``chance`` they are
    shifted by ``chance - 0.5`` (e.g. 5-class balanced accuracy, chance 0.2: 0.25, 0.35).
    With ``weak``/``strong`` the shifted thresholds:

    * ``"direction exists"``  if ``ci_low > strong``
    * ``"weak"``              if ``weak < ci_low <= strong``
    * ``"no linear signal"``  if ``ci_high < weak`` (the interval rules out even a weak effect)
    * ``"inconclusive"``      otherwise (the interval straddles ``weak``), or if a bound is
      NaN/None.
    """
    weak, strong = (float(t) + (float(chance) - 0.5) for t in thresholds)
    if not weak <= strong:
        raise ValueError(f"thresholds must be (weak, strong) with weak <= strong, got {thresholds}")
    lo = math.nan if ci_low is None else float(ci_low)
    hi = math.nan if ci_high is None else float(ci_high)
    if lo > hi:
        raise ValueError(f"ci_low {lo} > ci_high {hi}")
    if lo > strong:
        return "direction exists"
    if lo > weak:
        return "weak"
    if hi < weak:
        return "no linear signal"
    return "inconclusive"


_ROW_COLUMNS = (
    "metric",
    "mean",
    "std",
    "ci_low",
    "ci_high",
    "ci_method",
    "n",
    "n_per_class",
    "chance",
    "majority",
    "baseline",
    "primary",
    "p_permutation",
    "p_permutation_se",
    "random_direction_p95",
    "n_splits",
    "n_repeats",
    "C",
    "interpretation",
)


def summary_rows(
    result: ProbeResult | Mapping[str, Any],
    thresholds: tuple[float, float] = (0.55, 0.65),
    **keys: Any,
) -> list[dict[str, Any]]:
    """Tidy rows, one per metric (``METRICS`` order), ``keys`` (model, dataset, layer, ...) first.

    Columns: ``metric, mean, std, ci_low, ci_high, ci_method, n`` (folds used), ``n_per_class``
    (JSON string), ``chance`` and ``majority`` (see baselines), ``baseline = max(chance,
    majority)``, ``primary`` (bool), ``p_permutation`` and its Monte-Carlo standard error
    ``p_permutation_se`` (only on the primary-metric row, the
    only metric the permutation test was run for; None elsewhere and when skipped),
    ``random_direction_p95`` (primary row only), ``n_splits, n_repeats, C`` (final probe)
    and ``interpretation`` = :func:`interpret` of the interval with the thresholds shifted to
    the row's ``baseline`` (so accuracy on 60/40 data must clear 0.65/0.75).
    NaN values become None. ``result`` may be a :class:`ProbeResult` or its ``to_dict()``.
    """
    clash = set(keys) & set(_ROW_COLUMNS)
    if clash:
        raise ValueError(f"key columns clash with summary columns: {sorted(clash)}")
    d = result.to_dict() if isinstance(result, ProbeResult) else _jsonable(dict(result))
    rows = []
    for m in METRICS:
        s = d["metrics"][m]
        base = max(d["chance"][m], d["majority"][m])
        is_primary = m == d["primary_metric"]
        row = dict(keys)
        row.update(
            metric=m,
            mean=s["mean"],
            std=s["std"],
            ci_low=s["ci_low"],
            ci_high=s["ci_high"],
            ci_method=d["ci_method"],
            n=s["n"],
            n_per_class=json.dumps(d["n_per_class"], sort_keys=True),
            chance=d["chance"][m],
            majority=d["majority"][m],
            baseline=base,
            primary=is_primary,
            p_permutation=d["permutation"]["p_value"] if is_primary else None,
            p_permutation_se=d["permutation"].get("mc_se") if is_primary else None,
            random_direction_p95=d["random_directions"]["p95"] if is_primary else None,
            n_splits=d["n_splits"],
            n_repeats=d["n_repeats"],
            C=d["C"],
            interpretation=interpret(s["ci_low"], s["ci_high"], thresholds, chance=base),
        )
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------
# cross-dataset generalisation
# --------------------------------------------------------------------------------------


def cross_dataset_matrix(
    datasets: Mapping[str, tuple],
    *,
    positive_class: Any = None,
    metric: str = "auroc",
    n_splits: int = 5,
    n_repeats: int = 1,
    inner_splits: int = 3,
    Cs: Sequence[float] = (0.001, 0.01, 0.1, 1, 10, 100),
    seed: int = 0,
    max_iter: int = 1000,
    blas_threads: int | None = 1,
):
    """Train on each dataset, test on every other: a ``pandas.DataFrame`` of ``metric``.

    ``datasets`` maps a name to ``(X, y)`` or ``(X, y, groups)``; all must have the same
    number of features and the same label set (the label meaning is assumed shared). Rows
    are the training dataset (index name ``"train"``), columns the test dataset
    (``"test"``). Off-diagonal: one probe fitted on all of the training dataset (C by
    grouped inner CV there, as in :func:`fit_probe`) scored on all of the test dataset.
    Diagonal: the cross-validated mean from :func:`fit_probe` (no permutations/controls),
    since scoring a probe on its own training data would be meaningless.
    ``metric``: one of ``METRICS``.
    """
    import pandas as pd

    if metric not in METRICS:
        raise ProbeInputError(f"metric must be one of {METRICS}, got {metric!r}")
    if len(datasets) < 1:
        raise ProbeInputError("datasets is empty")
    Cs = _check_settings(n_splits, n_repeats, inner_splits, Cs, 0, 0)
    prepared = _prepare_datasets(datasets)
    names = list(prepared)
    out = pd.DataFrame(
        np.nan, index=pd.Index(names, name="train"), columns=pd.Index(names, name="test")
    )
    fit = dict(n_splits=n_splits, n_repeats=n_repeats, inner_splits=inner_splits, Cs=Cs)
    with _blas_limits(blas_threads):
        for a in names:
            res = fit_probe(
                *prepared[a],
                **fit,
                n_permutations=0,
                n_random_directions=0,
                seed=seed,
                max_iter=max_iter,
                positive_class=positive_class,
                blas_threads=None,
            )
            out.loc[a, a] = res.metrics[metric]["mean"]
            for b, value in _transfer_row(
                prepared, a, positive_class, metric, Cs, inner_splits, seed, max_iter
            ).items():
                out.loc[a, b] = value
    return out


def _prepare_datasets(
    datasets: Mapping[str, tuple],
) -> dict[str, tuple[np.ndarray, np.ndarray, Any]]:
    """Check every dataset's ``(X, y[, groups])``: same label set and number of features."""
    prepared: dict[str, tuple[np.ndarray, np.ndarray, Any]] = {}
    label_set = None
    n_features = None
    for name, tup in datasets.items():
        if not isinstance(tup, (tuple, list)) or len(tup) not in (2, 3):
            raise ProbeInputError(f"dataset {name!r}: expected (X, y) or (X, y, groups)")
        X = _check_X(tup[0], f"{name}: X")
        y = _check_labels(tup[1], X.shape[0], f"{name}: y")
        g = tup[2] if len(tup) == 3 else None
        labs = sorted(_py(v) for v in np.unique(y))
        if label_set is None:
            label_set, n_features = labs, X.shape[1]
        elif labs != label_set:
            raise ProbeInputError(f"dataset {name!r} has classes {labs}, others have {label_set}")
        elif X.shape[1] != n_features:
            raise ProbeInputError(
                f"dataset {name!r} has {X.shape[1]} features, others have {n_features}"
            )
        prepared[name] = (X, y, g)
    return prepared


def _transfer_row(prepared, a, positive_class, metric, Cs, inner_splits, seed, max_iter):
    """``metric`` on every other dataset of one probe fitted on all of dataset ``a``."""
    Xa, ya, ga = prepared[a]
    codes_a, classes = _encode(ya, positive_class)
    k = len(classes)
    fitter = _Fitter(max_iter)
    C, _ = _select_C(
        Xa, codes_a, _check_groups(ga, len(ya)), k, Cs, inner_splits, (seed, 5), fitter
    )
    model = fitter.fit(Xa, codes_a, C)
    lookup = {c: i for i, c in enumerate(classes)}
    row = {}
    for b, (Xb, yb, _) in prepared.items():
        if b == a:
            continue
        codes_b = np.array([lookup[_py(v)] for v in yb], dtype=np.int64)
        row[b] = fold_metrics(codes_b, model.predict_proba(Xb), k)[metric]
    return row


def transfer_metric(
    train: tuple,
    test: tuple,
    *,
    positive_class: Any = None,
    metric: str = "auroc",
    inner_splits: int = 3,
    Cs: Sequence[float] = (0.001, 0.01, 0.1, 1, 10, 100),
    seed: int = 0,
    n_boot: int = 1000,
    ci: float = 0.95,
    max_iter: int = 1000,
) -> dict[str, float]:
    """Fit a probe on all of ``train`` = (X, y, groups) (C by grouped inner CV, as in
    :func:`cross_dataset_matrix`), score it on ``test`` = (X, y): ``{"value", "ci_low",
    "ci_high"}``, the interval a percentile bootstrap over the test prompts (resamples missing a
    class skipped)."""
    Xa, ya, ga = _check_X(train[0], "train X"), train[1], train[2] if len(train) > 2 else None
    Xb = _check_X(test[0], "test X")
    codes_a, classes = _encode(_check_labels(ya, Xa.shape[0], "train y"), positive_class)
    k = len(classes)
    fitter = _Fitter(max_iter)
    with threadpool_limits(limits=1):
        C, _ = _select_C(
            Xa, codes_a, _check_groups(ga, len(ya)), k, tuple(Cs), inner_splits, (seed, 5), fitter
        )
        proba = fitter.fit(Xa, codes_a, C).predict_proba(Xb)
    lookup = {c: i for i, c in enumerate(classes)}
    codes_b = np.array([lookup[_py(v)] for v in test[1]], dtype=np.int64)
    value = fold_metrics(codes_b, proba, k)[metric]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 6]))
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, codes_b.size, codes_b.size)
        if np.unique(codes_b[idx]).size == k:
            boots.append(fold_metrics(codes_b[idx], proba[idx], k)[metric])
    lo, hi = np.quantile(boots, [(1 - ci) / 2, (1 + ci) / 2]) if boots else (np.nan, np.nan)
    return {"value": float(value), "ci_low": float(lo), "ci_high": float(hi)}
