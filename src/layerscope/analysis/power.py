"""How many pairs are enough: interval widths reached with n, and the n a goal needs.

Every intervention summary (generation patching, steering) reports, per cell, the interval it
reached and how many pairs or prompts a chosen precision or effect would need. Two kinds of
quantity occur:

* **rates** (share of pairs whose generated answer is the clean one; share of prompts whose
  prediction flips): a Wilson score interval, and exact binomial power;
* **means** (logit differences, KL divergences): a t interval, and the power of a one-sample
  t-test from the noncentral t distribution.

The n needed for a half-width solves the interval's own formula (not the normal shortcut), so a
reported half-width at the returned n is never above the target. Power searches n upwards;
exact binomial power is saw-toothed in n, and the smallest n reaching the power is returned.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats

from layerscope.errors import LayerscopeError

#: Upper bound of every search; an answer beyond it is reported as ``None`` (no feasible n).
MAX_N = 1_000_000


def _z(conf: float) -> float:
    if not 0.0 < conf < 1.0:
        raise LayerscopeError(f"confidence {conf} must lie strictly between 0 and 1")
    return float(stats.norm.ppf(0.5 + conf / 2.0))


def wilson_interval(k: Any, n: Any, conf: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of ``k`` successes in ``n`` trials (broadcast); NaN where n = 0."""
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    z = _z(conf)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1.0 + z * z / n
        centre = (p + z * z / (2.0 * n)) / denom
        half = z * np.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
    # At k = 0 (k = n) the bound is exactly 0 (1); centre - half rounds to about 1e-17 instead.
    lo = np.where(n > 0, np.where(k == 0, 0.0, np.clip(centre - half, 0.0, 1.0)), np.nan)
    hi = np.where(n > 0, np.where(k == n, 1.0, np.clip(centre + half, 0.0, 1.0)), np.nan)
    return lo, hi


def wilson_half_width(p: float, n: int, conf: float = 0.95) -> float:
    """Half-width of the Wilson interval at observed share ``p`` with ``n`` trials."""
    z = _z(conf)
    return z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / (1.0 + z * z / n)


def _smallest_n(ok, start: int = 1) -> int | None:
    """Smallest n >= start with ``ok(n)`` for a monotone predicate (doubling, then bisection)."""
    hi = max(start, 1)
    while not ok(hi):
        if hi >= MAX_N:
            return None
        hi = min(2 * hi, MAX_N)
    lo = max(start, hi // 2)
    if ok(lo):
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def n_for_rate_half_width(half_width: float, p: float = 0.5, conf: float = 0.95) -> int | None:
    """Trials needed for a Wilson interval no wider than ``half_width`` either side at share ``p``.

    ``p = 0.5`` is the worst case (the answer for a rate not yet known).
    """
    if not 0.0 < half_width < 0.5:
        raise LayerscopeError(
            f"half-width {half_width} of a rate must lie strictly between 0 and 0.5"
        )
    p = min(max(float(p), 0.0), 1.0)
    return _smallest_n(lambda n: wilson_half_width(p, n, conf) <= half_width)


def t_half_width(sd: float, n: int, conf: float = 0.95) -> float:
    """Half-width of the t interval of a mean with standard deviation ``sd`` over ``n`` values."""
    if n < 2:
        return math.inf
    return float(stats.t.ppf(0.5 + conf / 2.0, n - 1)) * sd / math.sqrt(n)


def n_for_mean_half_width(half_width: float, sd: float, conf: float = 0.95) -> int | None:
    """Values needed for a t interval of the mean no wider than ``half_width`` either side."""
    if half_width <= 0:
        raise LayerscopeError(f"half-width {half_width} must be positive")
    if not np.isfinite(sd):
        return None
    if sd == 0:
        return 2
    return _smallest_n(lambda n: t_half_width(sd, n, conf) <= half_width, start=2)


def binomial_power(n: int, p0: float, p1: float, alpha: float = 0.05) -> float:
    """Power of the exact two-sided binomial test of H0: rate = p0 when the true rate is p1."""
    if p1 == p0:
        return alpha
    ks = np.arange(n + 1)
    # One tail of a two-sided test at alpha: the tail in the direction of the effect, at alpha / 2.
    tail0 = stats.binom.sf(ks - 1, n, p0) if p1 > p0 else stats.binom.cdf(ks, n, p0)
    reject = tail0 <= alpha / 2.0
    return float(stats.binom.pmf(ks, n, p1)[reject].sum())


def n_for_rate_power(p0: float, p1: float, alpha: float = 0.05, power: float = 0.8) -> int | None:
    """Smallest n at which the exact binomial test tells rate ``p1`` from ``p0`` with ``power``.

    Exact power is saw-toothed in n (the critical count moves in steps), so this scans n upwards
    from 1 (to four times the normal-approximation guess) and returns the first n that reaches it.
    """
    if not (0.0 <= p0 <= 1.0 and 0.0 <= p1 <= 1.0) or p0 == p1:
        raise LayerscopeError(f"rates p0={p0} and p1={p1} must lie in [0, 1] and differ")
    za, zb = _z(1.0 - alpha), float(stats.norm.ppf(power))
    guess = ((za * math.sqrt(p0 * (1 - p0)) + zb * math.sqrt(p1 * (1 - p1))) / (p1 - p0)) ** 2
    for n in range(1, min(MAX_N, max(int(guess * 4) + 50, 200))):
        if binomial_power(n, p0, p1, alpha) >= power:
            return n
    return None


def t_power(n: int, effect: float, sd: float, alpha: float = 0.05) -> float:
    """Power of the two-sided one-sample t-test of mean 0 when the true mean is ``effect``."""
    if n < 2 or sd <= 0:
        return float("nan")
    df = n - 1
    crit = float(stats.t.ppf(1.0 - alpha / 2.0, df))
    nc = effect / sd * math.sqrt(n)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def n_for_mean_power(
    effect: float, sd: float, alpha: float = 0.05, power: float = 0.8
) -> int | None:
    """Values needed for a one-sample t-test to detect a mean shift ``effect`` with ``power``."""
    if effect == 0:
        raise LayerscopeError("an effect of 0 cannot be detected; give a non-zero effect size")
    if not np.isfinite(sd):
        return None
    if sd == 0:
        return 2
    return _smallest_n(lambda n: t_power(n, abs(effect), sd, alpha) >= power, start=2)


def rate_precision(
    k: int,
    n: int,
    *,
    half_width: float,
    effect: float,
    p0: float = 0.0,
    conf: float = 0.95,
    power: float = 0.8,
) -> dict[str, Any]:
    """The "how many is enough" columns of one rate: interval reached and the n two goals need.

    ``half_width``: target interval half-width. ``effect``: rate difference from ``p0`` (the
    rate without intervention) to detect with ``power``; the target rate is clipped into [0, 1].
    """
    lo, hi = wilson_interval(k, n, conf)
    p = k / n if n else 0.5
    p1 = min(max(p0 + effect, 0.0), 1.0)
    return {
        "ci_low": float(lo),
        "ci_high": float(hi),
        "half_width": float((hi - lo) / 2) if n else math.nan,
        "n_for_half_width": n_for_rate_half_width(half_width, p if n else 0.5, conf),
        "n_for_power": n_for_rate_power(p0, p1, 1.0 - conf, power) if p1 != p0 else None,
    }


def mean_precision(
    values: Any, *, half_width: float, effect: float, conf: float = 0.95, power: float = 0.8
) -> dict[str, Any]:
    """The "how many is enough" columns of one mean (NaNs left out): t interval and the n needed."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = int(x.size)
    mean = float(x.mean()) if n else math.nan
    sd = float(x.std(ddof=1)) if n > 1 else math.nan
    hw = t_half_width(sd, n, conf) if n > 1 else math.nan
    return {
        "mean": mean,
        "ci_low": mean - hw,
        "ci_high": mean + hw,
        "half_width": hw,
        "n": n,
        "n_for_half_width": n_for_mean_half_width(half_width, sd, conf) if n > 1 else None,
        "n_for_power": n_for_mean_power(effect, sd, 1.0 - conf, power) if n > 1 else None,
    }
