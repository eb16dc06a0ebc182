"""Causal test of probe directions: ablate (project out) and add (+-alpha) each family's direction.

Pure computation on a model with the steering hooks contract (:mod:`.steering`): a list of
directions at one layer in, one tidy table out. Reading probe files and writing tables live in
:mod:`layerscope.jobs.probe_causal_run`.

Behavioural metric (see docs/methods.md, "Probe validity"): ``LD = logit[positive answer] -
logit[negative answer]`` at the answer position of held-out prompts, the steering experiment's
prompts (which the probe never saw), whose positive answer is the one the probe's positive class
stands for. Two effects per direction ``u`` (unit, the positive class's side), each the mean over
prompts of the change from the unablated, unsteered run:

* ``ablation``: ``x <- x - (x . u) u`` at every position of the layer's residual; intended sign
  negative (the model loses what it reads from ``u``).
* ``addition``: ``(dLD(+alpha) - dLD(-alpha)) / 2`` with ``alpha * scale * u`` added at every
  position (``scale`` the layer's mean residual norm, as in steering); intended sign positive.

Null band: the same effects for ``n_random`` seeded random unit directions, 5 % and 95 %
quantiles. Verdict per effect: ``intended`` / ``opposite`` (beyond the band on that side) or
``inside``; per direction (:func:`verdict`): ``causal`` (some effect intended, none opposite),
``opposite`` (the reverse), ``correlational only`` (every effect inside the band) or ``mixed``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from layerscope.interventions.steering import (
    BAND_QUANTILES,
    SteeringPrompts,
    forward_logits,
    logit_diffs,
    random_directions,
    unit,
)

EFFECTS = {"ablation": -1, "addition": 1}  # effect -> intended sign
CAUSAL_COLUMNS = (
    "layer",
    "direction",
    "effect",
    "value",
    "band_low",
    "band_high",
    "intended_sign",
    "outcome",
    "alpha",
    "scale",
    "n_prompts",
    "n_random",
)


def ablation_hook(vector) -> Any:
    """A hook projecting ``vector`` (unit; [d], or [B, d] one per batch row) out of the residual
    at every position."""

    def hook(tensor, hook=None):
        u = vector.to(tensor.device, tensor.dtype)
        u = u[None, :] if u.dim() == 1 else u
        return tensor - (tensor * u[:, None, :]).sum(-1, keepdim=True) * u[:, None, :]

    return hook


def _batched_ld(model, sp: SteeringPrompts, hook: str, U: np.ndarray, make, batch_size, pad_id):
    """LD (n_dirs, n_prompts) with every prompt run once per direction row of ``U``, directions
    sharing batches (``make(vectors)`` builds the hook for a batch's rows). Directions go in
    chunks of about ``batch_size`` rows: ``forward_logits`` keeps every row's full logits."""
    n = len(sp.ids)
    step = max(1, batch_size // n)
    if len(U) > step:
        parts = [U[i : i + step] for i in range(0, len(U), step)]
        return np.vstack([_batched_ld(model, sp, hook, P, make, batch_size, pad_id) for P in parts])
    import torch

    rows = [r for _ in range(len(U)) for r in sp.ids]
    V = torch.as_tensor(np.repeat(U, n, axis=0))
    logits = forward_logits(
        model, rows, [(hook, lambda a, b: make(V[a:b]))], batch_size=batch_size, pad_id=pad_id
    )
    pos, neg = np.tile(sp.positive_id, len(U)), np.tile(sp.negative_id, len(U))
    return logit_diffs(logits, pos, neg).reshape(len(U), n)


def direction_effects(model, sp, hook, U, *, alpha, scale, ld0, batch_size, pad_id) -> list[dict]:
    """Per row of ``U`` (unit directions): ``{"ablation": mean dLD, "addition": (mean dLD(+a) -
    mean dLD(-a)) / 2}``."""
    import torch

    from layerscope.interventions.steering import steering_hook

    zeros = torch.zeros(batch_size, dtype=torch.long)
    run = dict(batch_size=batch_size, pad_id=pad_id)
    abl = _batched_ld(model, sp, hook, U, ablation_hook, **run) - ld0

    def added(step):
        make = lambda v: steering_hook(v, zeros[: len(v)])  # noqa: E731
        return _batched_ld(model, sp, hook, step * U, make, **run)

    diff = (added(alpha * scale) - added(-alpha * scale)) / 2
    return [{"ablation": float(a.mean()), "addition": float(d.mean())} for a, d in zip(abl, diff)]


def causal_test(
    model,
    sp: SteeringPrompts,
    layer: int,
    directions: Mapping[str, Any],
    *,
    hook: str,
    alpha: float,
    scale: float,
    n_random: int = 20,
    seed: int = 0,
    batch_size: int = 64,
    pad_id: int = 0,
) -> pd.DataFrame:
    """One row per (direction, effect) with the random band and the outcome (CAUSAL_COLUMNS)."""
    if n_random < 2:
        raise ValueError("the random band needs n_random >= 2 directions")
    ld0 = logit_diffs(
        forward_logits(model, sp.ids, batch_size=batch_size, pad_id=pad_id),
        sp.positive_id,
        sp.negative_id,
    )
    kw = dict(alpha=alpha, scale=scale, ld0=ld0, batch_size=batch_size, pad_id=pad_id)
    names = list(directions)
    d_model = len(directions[names[0]])
    U = np.vstack(
        [[unit(directions[k], k) for k in names], random_directions(n_random, d_model, seed)]
    )
    effects = direction_effects(model, sp, hook, U, **kw)
    found, rand = dict(zip(names, effects[: len(names)])), effects[len(names) :]
    rows = []
    for eff, sign in EFFECTS.items():
        lo, hi = np.quantile([r[eff] for r in rand], BAND_QUANTILES)
        for name, vals in found.items():
            v = vals[eff]
            outcome = (
                "inside"
                if lo <= v <= hi
                else ("intended" if (v > hi) == (sign > 0) else "opposite")
            )
            rows.append(dict(layer=int(layer), direction=name, effect=eff, value=v,
                             band_low=float(lo), band_high=float(hi), intended_sign=sign,
                             outcome=outcome, alpha=float(alpha), scale=float(scale),
                             n_prompts=len(sp.ids), n_random=int(n_random)))  # fmt: skip
    return pd.DataFrame(rows, columns=list(CAUSAL_COLUMNS))


def verdict(outcomes) -> str:
    """The probe card's word for one direction from its effects' outcomes."""
    outcomes = set(outcomes)
    if "intended" in outcomes and "opposite" not in outcomes:
        return "causal"
    if "opposite" in outcomes and "intended" not in outcomes:
        return "opposite"
    if outcomes <= {"inside"}:
        return "correlational only"
    return "mixed"
