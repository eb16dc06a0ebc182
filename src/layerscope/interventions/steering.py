"""Steering: add alpha * (unit direction) to the residual stream and measure what moves.

Pure computation: arrays, tables and a model object in; arrays and tables out. Reading direction
files, probe JSON and prompt files, and writing results, live in
:mod:`layerscope.jobs.steering_run`.

Directions (:func:`unit`, :func:`probe_direction`, :func:`mass_mean_direction`,
:func:`task_vector_direction`, :func:`file_direction`) are vectors in the raw residual-stream
space of one layer. The probe JSON stores the final probe as ``coef`` *already in raw activation
space* (``probes.fit_probe`` divides the standardized coefficients by the scaler's ``scale_``), so
``coef[0]`` is the gradient of the probe's logit for the positive class with respect to the raw
activation: the direction along which the probe's score rises fastest per unit of L2 norm. It is
used as is (no second division by the scale).

Intervention (:func:`steering_hook`): at hook ``blocks.L.hook_resid_post`` (or ``hook_resid_pre``)
every row gets ``alpha * scale_L * u`` added at every position ``>= start`` of that row (never at
a prepended BOS, which the scale leaves out too; see docs/methods.md, "Steering"), where
``u`` is the unit direction and ``scale_L`` the mean per-token L2 norm of the unsteered residual
at that hook over the experiment's prompts (BOS left out), so ``alpha = 1`` means "a step as long
as a typical residual vector at this layer" in every layer and model. The hook works on the
prompt pass and on the one-token steps of generation (it tracks the absolute position).

Metrics per (layer, alpha, direction), each a change from the unsteered run, so alpha = 0 gives
exactly 0 (adding a zero vector leaves every float unchanged and the batches are laid out the
same for every run):

* ``logit_diff``: mean over prompts of ``LD_steered - LD_unsteered`` with ``LD = logit[positive
  answer token] - logit[negative answer token]`` at the answer position (t interval).
* ``flip_rate``: share of prompts whose prediction (sign of LD) moves to the intended side (the
  positive answer for alpha > 0, the negative one for alpha < 0) from the other side (Wilson).
* ``kl_neutral``: damage guard; mean over neutral prompts of the mean over their steered
  positions of ``KL(p_unsteered || p_steered)`` of the next-token distributions (t interval).

Controls: ``n_random`` seeded Gaussian directions, unit-normalised, on the same grid. Their band
per (layer, alpha, metric) is the 5 % and 95 % quantile across directions (value: the median).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from layerscope.analysis.power import mean_precision, rate_precision
from layerscope.engine.loading import hook_name, model_device
from layerscope.engine.tokens import tokenize_prompts
from layerscope.errors import LayerscopeError
from layerscope.settings import PrecisionSettings

HOOK_COMPONENTS = ("resid_post", "resid_pre")
METRICS = ("logit_diff", "flip_rate", "kl_neutral")
BAND_QUANTILES = (0.05, 0.95)
EFFECT_COLUMNS = (
    "layer",
    "alpha",
    "source",
    "direction",
    "metric",
    "statistic",
    "value",
    "ci_low",
    "ci_high",
    "n",
    "half_width",
    "n_for_half_width",
    "n_for_power",
    "scale",
    "beyond_random",
)


class SteeringError(LayerscopeError, ValueError):
    """Bad input to a steering function (shapes, zero directions, unknown names)."""


# --------------------------------------------------------------------------------------------
# directions


def unit(vector: Any, what: str = "direction") -> np.ndarray:
    """``vector / ||vector||`` as float64; a zero, empty or non-finite vector is an error."""
    v = np.asarray(vector, dtype=np.float64).reshape(-1)
    if v.size == 0 or not np.all(np.isfinite(v)):
        raise SteeringError(f"{what}: empty or not finite")
    norm = float(np.linalg.norm(v))
    if norm == 0.0:
        raise SteeringError(f"{what}: the zero vector has no direction")
    return v / norm


def probe_direction(
    doc: Mapping[str, Any], component: str, pooling: str, what: str = "probe"
) -> np.ndarray:
    """The positive-class direction of the binary probe for (component, pooling) in a probe JSON
    doc.

    ``coef`` is stored in raw activation space (see the module docstring); it is unit-normalised
    here.
    """
    probes = doc.get("probes")
    if not isinstance(probes, list):
        raise SteeringError(f"{what}: field 'probes' is missing; not a probe file")
    for probe in probes:
        if probe.get("component") == component and probe.get("pooling") == pooling:
            coef = (probe.get("result") or {}).get("coef")
            if not isinstance(coef, list) or not coef:
                raise SteeringError(
                    f"{what}: field 'probes[].result.coef' is missing for {component}/{pooling}"
                )
            if len(coef) != 1:
                raise SteeringError(
                    f"{what}: the {component}/{pooling} probe has {len(coef)} classes; "
                    "steering needs a binary probe (one coefficient row)"
                )
            return unit(coef[0], f"{what}: {component}/{pooling} coef")
    have = sorted({f"{p.get('component')}/{p.get('pooling')}" for p in probes})
    raise SteeringError(f"{what}: no probe for {component}/{pooling}; the file has {have}")


def mass_mean_direction(
    X: Any, labels: Sequence[Any], positive: Any, what: str = "activations"
) -> np.ndarray:
    """``mean(X[label == positive]) - mean(X[label != positive])``, unit-normalised."""
    X = np.asarray(X, dtype=np.float64)
    lab = np.asarray([str(v) for v in labels])
    if X.ndim != 2 or X.shape[0] != lab.size:
        raise SteeringError(f"{what}: X has shape {X.shape} for {lab.size} labels")
    pos = lab == str(positive)
    if not pos.any() or pos.all():
        raise SteeringError(
            f"{what}: mass-mean needs prompts of the positive class {positive!r} and of "
            f"others; "
            f"labels present: {sorted(set(lab.tolist()))}"
        )
    return unit(X[pos].mean(axis=0) - X[~pos].mean(axis=0), f"{what}: mass-mean difference")


def task_vector_direction(
    arrays: Mapping[str, Any], layer: int, task: str, what: str = "task vectors"
) -> np.ndarray:
    """The task vector of ``task`` at ``layer`` from
    :func:`layerscope.analysis.task_vectors.read_task_vectors`."""
    layers = [int(L) for L in arrays["layers"]]
    tasks = list(arrays["tasks"])
    if int(layer) not in layers:
        raise SteeringError(f"{what}: no layer {layer}; the file has layers {layers}")
    if task not in tasks:
        raise SteeringError(f"{what}: no task {task!r}; the file has tasks {tasks}")
    return unit(
        arrays["task_vectors"][layers.index(int(layer))][tasks.index(task)],
        f"{what}: task {task!r}",
    )


def file_direction(
    array: Any, layer: int, n_layers: int, d_model: int, what: str = "direction file"
) -> np.ndarray:
    """One layer's vector from a user array: ``[d]`` (every layer) or ``[n_layers, d]`` (row =
    layer)."""
    a = np.asarray(array)
    if a.dtype.kind not in "fiu":
        raise SteeringError(f"{what}: expected numbers, got dtype {a.dtype}")
    if a.ndim == 1:
        row = a
    elif a.ndim == 2 and a.shape[0] == n_layers:
        row = a[int(layer)]
    else:
        raise SteeringError(
            f"{what}: shape {a.shape}; expected [{d_model}] or [{n_layers}, {d_model}] "
            f"(one row per layer of the model)"
        )
    if row.shape[0] != d_model:
        raise SteeringError(
            f"{what}: vectors have {row.shape[0]} entries; the model's d_model is {d_model}"
        )
    return unit(row, f"{what}: layer {layer}")


def random_directions(n: int, d_model: int, seed: int) -> np.ndarray:
    """``n`` seeded Gaussian directions of unit norm, shape ``[n, d_model]`` (the same at every
    layer)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 11]))
    U = rng.standard_normal((int(n), int(d_model)))
    return U / np.linalg.norm(U, axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------
# prompts and answer tokens


@dataclass
class SteeringPrompts:
    """Tokenized experiment prompts (answer position last) and neutral prompts."""

    prompt_ids: list[str]
    ids: list[list[int]]  # prompt (+ BOS) + shared answer prefix
    positive_id: np.ndarray  # first answer token where the two answers differ
    negative_id: np.ndarray
    neutral_ids: list[list[int]]
    prepend_bos: bool
    # prompt ids whose positive or negative answer has tokens after the compared one (not scored)
    multi_token: list[str] = field(default_factory=list)


def prepare_prompts(
    tokenizer, prompts: pd.DataFrame, neutral: Sequence[str], *, prepend_bos: bool
) -> SteeringPrompts:
    """Tokenize ``prompts`` (columns ``prompt_id, prompt, positive, negative``) and the neutral
    texts.

    Answers are tokenized in context as in :mod:`layerscope.interventions.patching`: the metric
    compares the first answer tokens where the positive and negative answers differ, the shared
    prefix appended.
    """
    from layerscope.interventions.patching import answer_ids

    ids, pos, neg, multi = [], [], [], []
    source = prompts.attrs.get("source", "prompts")
    for i, rec in enumerate(prompts.itertuples(index=False)):
        base = tokenize_prompts(tokenizer, [rec.prompt], prepend_bos=prepend_bos)[0]
        a, _ = answer_ids(tokenizer, base, rec.prompt, rec.positive, prepend_bos)
        b, _ = answer_ids(tokenizer, base, rec.prompt, rec.negative, prepend_bos)
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if k is None:
            raise SteeringError(
                f"{source}: row {i + 1} ({rec.prompt_id}): answers {rec.positive!r} and "
                f"{rec.negative!r} share every token; no token tells them apart"
            )
        ids.append(base + a[:k])
        pos.append(a[k])
        neg.append(b[k])
        if max(len(a), len(b)) > k + 1:
            multi.append(str(rec.prompt_id))
    neutral_ids = tokenize_prompts(tokenizer, list(neutral), prepend_bos=prepend_bos)
    if any(len(x) < 2 for x in neutral_ids):
        raise SteeringError(
            "every neutral prompt needs at least 2 tokens (one next-token prediction)"
        )
    return SteeringPrompts(
        [str(p) for p in prompts["prompt_id"]],
        ids,
        np.asarray(pos),
        np.asarray(neg),
        neutral_ids,
        prepend_bos,
        multi,
    )


# --------------------------------------------------------------------------------------------
# the intervention


def steering_hook(vector, starts, offset: list[int] | None = None) -> Callable:
    """A TransformerLens-style hook adding ``vector`` ([d] or [B, d]) at positions ``>= starts[b]``.

    ``offset`` (a one-element list) is the absolute position of the tensor's first column; the
    generation loop raises it after each step so a one-token step is steered at its true position.
    """
    import torch

    offset = offset if offset is not None else [0]

    def hook(tensor, hook=None):
        T = tensor.shape[1]
        pos = torch.arange(offset[0], offset[0] + T, device=tensor.device)
        mask = (pos[None, :] >= starts.to(tensor.device)[:, None]).to(tensor.dtype)
        v = vector.to(tensor.device, tensor.dtype)
        v = v[:, None, :] if v.dim() == 2 else v[None, None, :]
        return tensor + mask[:, :, None] * v

    return hook


def row_starts(lengths: Sequence[int], position: int | str, first: int = 0) -> np.ndarray:
    """First steered position per row: ``"all"`` -> 0; ``p >= 0`` -> p; ``p < 0`` -> length + p;
    never before ``first`` (1 when BOS is prepended: BOS is not steered, see docs/methods.md)."""
    L = np.asarray(lengths, dtype=np.int64)
    if position == "all":
        starts = np.zeros_like(L)
    else:
        p = int(position)
        starts = np.maximum(L + p, 0) if p < 0 else np.full_like(L, p)
    return np.maximum(starts, int(first))


def padded(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[Any, Any]:
    """Right-padded ``input_ids`` and an explicit attention mask (padding never inferred from
    ids)."""
    import torch

    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), int(pad_id), dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), T), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def forward_logits(
    model, rows: Sequence[Sequence[int]], fwd_hooks=(), *, batch_size: int = 64, pad_id: int = 0
) -> list[Any]:
    """Float64 logits per row (``[len_r, V]``) from right-padded batches of fixed composition.

    The chunking depends only on ``rows`` and ``batch_size``, so a steered and an unsteered run
    see identical batches. ``fwd_hooks``: ``(name, make_fn)`` where ``make_fn(starts_tensor)``
    returns the hook for one batch (rows of the batch in order).
    """

    out: list[Any] = []
    device = model_device(model)
    for b in range(0, len(rows), batch_size):
        chunk = rows[b : b + batch_size]
        ids, mask = padded(chunk, pad_id, device)
        hooks = [(name, make(b, b + len(chunk))) for name, make in fwd_hooks]
        with model.hooks(fwd_hooks=hooks):
            logits = model(ids, attention_mask=mask, return_type="logits")
        for i, r in enumerate(chunk):
            out.append(logits[i, : len(r)].double())
    return out


def _steer_hooks(name: str, vector, starts: np.ndarray):
    """``[(name, make)]``: ``make(a, b)`` is the hook steering batch rows ``a:b`` at ``name``."""
    import torch

    st = torch.as_tensor(starts, dtype=torch.long)
    return [(name, lambda a, b: steering_hook(vector, st[a:b]))]


def run_rows(model, rows, hook: str | None, vector, starts, *, batch_size: int, pad_id: int):
    """Logits of ``rows`` with ``vector`` added at ``hook`` from ``starts`` on (no hook:
    unsteered)."""
    hooks = [] if hook is None else _steer_hooks(hook, vector, starts)
    return forward_logits(model, rows, hooks, batch_size=batch_size, pad_id=pad_id)


def residual_norms(
    model, rows, hooks: Sequence[str], *, skip_first: bool, batch_size: int, pad_id: int
) -> dict[str, float]:
    """Mean per-token L2 norm of the unsteered residual at each hook over the real tokens of
    ``rows``."""

    sums = {h: 0.0 for h in hooks}
    count = 0
    device = model_device(model)
    for b in range(0, len(rows), batch_size):
        chunk = rows[b : b + batch_size]
        ids, mask = padded(chunk, pad_id, device)
        keep = mask.clone()
        if skip_first:
            keep[:, 0] = 0  # the BOS residual is an outlier in norm (and never pooled)
        count += int(keep.sum())

        def make(h, keep=keep):
            def fn(t, hook=None):
                sums[h] += float((t.double().norm(dim=-1) * keep).sum())
                return None

            return fn

        with model.hooks(fwd_hooks=[(h, make(h)) for h in hooks]):
            model(ids, attention_mask=mask, return_type="logits")
    if count == 0:
        raise SteeringError("no prompt tokens to measure the residual norm on")
    return {h: sums[h] / count for h in hooks}


# --------------------------------------------------------------------------------------------
# per-run measurements


def logit_diffs(logits: Sequence[Any], pos_id: np.ndarray, neg_id: np.ndarray) -> np.ndarray:
    """``logit[positive] - logit[negative]`` at the last position of each row."""
    return np.array(
        [float(lg[-1, int(p)] - lg[-1, int(n)]) for lg, p, n in zip(logits, pos_id, neg_id)]
    )


def next_token_kl(
    base: Sequence[Any], steered: Sequence[Any], starts: Sequence[int] | None = None
) -> np.ndarray:
    """Per row: mean over positions ``>= starts[row]`` (default: every position) of
    ``KL(softmax(base) || softmax(steered))`` (exactly 0 if equal). Positions before the first
    steered one cannot change (causal attention), so they are left out rather than averaged in as
    zeros."""
    import torch

    out = []
    for i, (a, b) in enumerate(zip(base, steered)):
        s = 0 if starts is None else int(starts[i])
        if s >= a.shape[0]:  # nothing of this row is steered
            out.append(0.0)
            continue
        la, lb = torch.log_softmax(a[s:], dim=-1), torch.log_softmax(b[s:], dim=-1)
        out.append(float((la.exp() * (la - lb)).sum(dim=-1).mean()))
    return np.asarray(out)


def flips(ld0: np.ndarray, ld: np.ndarray, alpha: float) -> np.ndarray:
    """Per prompt: did the prediction move to the intended side (positive for alpha > 0)?"""
    if alpha > 0:
        return (ld0 <= 0) & (ld > 0)
    if alpha < 0:
        return (ld0 > 0) & (ld <= 0)
    return np.zeros(np.shape(ld0), dtype=bool)


def mean_row(values: np.ndarray, prec: PrecisionSettings) -> dict[str, Any]:
    """Mean with t interval and the n a half-width / a Cohen's-d effect needs (0 exactly when all
    0)."""
    x = np.asarray(values, dtype=np.float64)
    sd = float(x.std(ddof=1)) if x.size > 1 else math.nan
    if x.size > 1 and sd == 0.0:
        m = float(x.mean())
        return dict(
            value=m,
            ci_low=m,
            ci_high=m,
            n=int(x.size),
            half_width=0.0,
            n_for_half_width=2,
            n_for_power=None,
        )
    r = mean_precision(
        x,
        half_width=prec.half_width,
        effect=prec.effect_size * (sd if sd > 0 else 1.0),
        conf=prec.confidence,
        power=prec.power,
    )
    return dict(
        value=r["mean"],
        ci_low=r["ci_low"],
        ci_high=r["ci_high"],
        n=r["n"],
        half_width=r["half_width"],
        n_for_half_width=r["n_for_half_width"],
        n_for_power=r["n_for_power"],
    )


def rate_row(
    hits: np.ndarray, prec: PrecisionSettings, *, intervened: bool = True
) -> dict[str, Any]:
    """Share with Wilson interval (rounding noise at 0 / n clipped), and the n two goals need.

    ``intervened=False`` (alpha = 0): nothing was changed, so the share is 0 by construction and
    its interval is [0, 0]; the n columns still say what a real intervention would need."""
    k, n = int(np.sum(hits)), int(np.size(hits))
    r = rate_precision(
        k,
        n,
        half_width=min(prec.half_width, 0.49),
        effect=prec.rate_effect,
        p0=0.0,
        conf=prec.confidence,
        power=prec.power,
    )
    lo, hi = (0.0 if k == 0 else r["ci_low"]), (1.0 if k == n else r["ci_high"])
    if not intervened:
        lo = hi = 0.0
    return dict(
        value=k / n if n else math.nan,
        ci_low=lo,
        ci_high=hi,
        n=n,
        half_width=(hi - lo) / 2,
        n_for_half_width=r["n_for_half_width"],
        n_for_power=r["n_for_power"],
    )


# --------------------------------------------------------------------------------------------
# the sweep


@dataclass
class SteeringResult:
    """What :func:`steering_sweep` returns: tidy effects, per-prompt values, norms, info."""

    effects: pd.DataFrame
    per_prompt: pd.DataFrame
    norms: pd.DataFrame
    info: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _check_grid(
    model, layers: Sequence[int], alphas: Sequence[float], component: str
) -> tuple[list[int], list[float]]:
    """Sorted layers and alphas (0 added); bad hook, layer or alpha is an error."""
    if component not in HOOK_COMPONENTS:
        raise SteeringError(
            f"hook {component!r}: steering adds to the residual stream; "
            f"use one of {HOOK_COMPONENTS}"
        )
    n_layers = int(model.cfg.n_layers)
    layers = sorted({int(L) for L in layers})
    bad = [L for L in layers if not 0 <= L < n_layers]
    if bad or not layers:
        raise SteeringError(
            f"layers {bad or layers} invalid; the model has layers 0..{n_layers - 1}"
        )
    alphas = sorted({float(a) for a in alphas} | {0.0})
    if not all(math.isfinite(a) for a in alphas):
        raise SteeringError(f"alphas must be finite numbers, got {alphas}")
    for L in layers:
        if hook_name(component, L) not in model.hook_dict:
            raise SteeringError(f"the model has no hook {hook_name(component, L)!r}")
    return layers, alphas


def _measure(model, sp: SteeringPrompts, base, hook, vector, starts, batch_size, pad_id):
    """One steered run of prompts + neutral prompts -> (per-prompt LD, per-neutral-prompt KL)."""
    rows = sp.ids + sp.neutral_ids
    logits = run_rows(model, rows, hook, vector, starts, batch_size=batch_size, pad_id=pad_id)
    n = len(sp.ids)
    ld = logit_diffs(logits[:n], sp.positive_id, sp.negative_id)
    return ld, next_token_kl(base[n:], logits[n:], starts[n:])


def _metric_rows(
    keys: dict[str, Any], ld0, ld, kl, alpha, prec: PrecisionSettings
) -> list[dict[str, Any]]:
    """The three effect rows (LD change, flip rate, neutral KL) of one run."""
    return [
        {
            **keys,
            "metric": "logit_diff",
            "statistic": "mean change over prompts (t interval)",
            **mean_row(ld - ld0, prec),
        },
        {
            **keys,
            "metric": "flip_rate",
            "statistic": "share of prompts flipped to the intended answer (Wilson)",
            **rate_row(flips(ld0, ld, alpha), prec, intervened=alpha != 0),
        },
        {
            **keys,
            "metric": "kl_neutral",
            "statistic": "mean KL(unsteered || steered) over neutral prompts (t interval)",
            **mean_row(kl, prec),
        },
    ]


def random_band(effects: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, alpha, metric): median and 5 %/95 % quantiles of the random directions'
    values."""
    r = effects[effects["source"] == "random"]
    rows = []
    for (L, a, m), g in r.groupby(["layer", "alpha", "metric"], sort=True):
        v = g["value"].to_numpy(dtype=float)
        lo, hi = np.quantile(v, BAND_QUANTILES)
        rows.append(
            dict(
                layer=L,
                alpha=a,
                source="random",
                direction="band",
                metric=m,
                statistic=f"median over {len(v)} random directions; interval = "
                f"{BAND_QUANTILES[0]:.0%}-{BAND_QUANTILES[1]:.0%} quantiles across them",
                value=float(np.median(v)),
                ci_low=float(lo),
                ci_high=float(hi),
                n=len(v),
                scale=float(g["scale"].iloc[0]),
            )
        )
    return pd.DataFrame(rows)


def _with_band(effects: pd.DataFrame) -> pd.DataFrame:
    """Effects plus the random band rows and ``beyond_random`` for the others."""
    band = random_band(effects)
    out = pd.concat([effects, band], ignore_index=True)
    key = ["layer", "alpha", "metric"]
    b = band.set_index(key)[["ci_low", "ci_high"]].rename(
        columns={"ci_low": "_lo", "ci_high": "_hi"}
    )
    out = out.join(b, on=key)
    main = (out["source"] != "random") & out["_lo"].notna()
    out["beyond_random"] = pd.Series([None] * len(out), dtype=object)
    out.loc[main, "beyond_random"] = (out.loc[main, "value"] < out.loc[main, "_lo"]) | (
        out.loc[main, "value"] > out.loc[main, "_hi"]
    )
    return out.drop(columns=["_lo", "_hi"])


@dataclass(frozen=True)
class _SweepRun:
    """What every steered run of one sweep shares: prompts, unsteered baseline, batching."""

    sp: SteeringPrompts
    base: list
    ld0: np.ndarray
    starts: np.ndarray
    batch_size: int
    pad_id: int
    prec: PrecisionSettings


def _unit_directions(model, directions, layers: Sequence[int], source: str) -> dict[int, Any]:
    """Unit vectors per layer; each must have ``d_model`` entries."""
    d = int(model.cfg.d_model)
    units = {L: unit(directions[L], f"{source} direction at layer {L}") for L in layers}
    for L, u in units.items():
        if u.size != d:
            raise SteeringError(
                f"{source} direction at layer {L} has {u.size} entries; the model's d_model is {d}"
            )
    return units


def _per_prompt(run: _SweepRun, layer: int, alpha: float, ld) -> pd.DataFrame:
    """Per-prompt LD, its change and flips of the main direction at one (layer, alpha)."""
    return pd.DataFrame(
        dict(
            layer=layer,
            alpha=alpha,
            prompt_id=run.sp.prompt_ids,
            logit_diff=ld,
            logit_diff_change=ld - run.ld0,
            flipped=flips(run.ld0, ld, alpha),
        )
    )


def _sweep_layer(model, run: _SweepRun, layer: int, hook: str, scale: float, dirs, alphas):
    """Every direction x alpha at one layer: (effect records, per-prompt frames of the main
    direction). ``dirs``: (source, name, unit vector, is the main direction)."""
    import torch

    records: list[dict[str, Any]] = []
    per_prompt: list[pd.DataFrame] = []
    zero = None
    for src, name, u, main in dirs:
        for a in alphas:
            if a == 0.0 and zero is not None:
                ld, kl = zero  # alpha = 0 adds the zero vector whatever the direction
            else:
                v = torch.as_tensor(a * scale * u, dtype=torch.float64)
                ld, kl = _measure(
                    model, run.sp, run.base, hook, v, run.starts, run.batch_size, run.pad_id
                )
                zero = (ld, kl) if a == 0.0 else zero
            keys = dict(layer=layer, alpha=a, source=src, direction=name, scale=scale)
            records += _metric_rows(keys, run.ld0, ld, kl, a, run.prec)
            if main:
                per_prompt.append(_per_prompt(run, layer, a, ld))
    return records, per_prompt


def _effects_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """The tidy effects with the random band, in :data:`EFFECT_COLUMNS` order, sorted."""
    effects = _with_band(pd.DataFrame(records))
    return (
        effects[list(EFFECT_COLUMNS)]
        .sort_values(["source", "direction", "metric", "layer", "alpha"], kind="stable")
        .reset_index(drop=True)
    )


def steering_sweep(
    model,
    sp: SteeringPrompts,
    directions: Mapping[int, np.ndarray],
    *,
    alphas: Sequence[float],
    component: str = "resid_post",
    position: int | str = "all",
    source: str = "direction",
    n_random: int = 10,
    seed: int = 0,
    precision: PrecisionSettings | None = None,
    batch_size: int = 64,
    log: Callable[[str], Any] | None = None,
) -> SteeringResult:
    """Steer along ``directions`` (layer -> vector) and ``n_random`` random directions on
    layers x alphas."""
    import torch

    log = log or (lambda msg: None)
    layers, alphas = _check_grid(model, list(directions), alphas, component)
    units = _unit_directions(model, directions, layers, source)
    pad_id = int(getattr(model.tokenizer, "pad_token_id", None) or 0)
    rows = sp.ids + sp.neutral_ids
    starts = row_starts([len(r) for r in rows], position, first=int(sp.prepend_bos))
    n = len(sp.ids)
    hooks = {L: hook_name(component, L) for L in layers}
    with torch.inference_mode():
        base = run_rows(model, rows, None, None, None, batch_size=batch_size, pad_id=pad_id)
        ld0 = logit_diffs(base[:n], sp.positive_id, sp.negative_id)
        scale = residual_norms(
            model,
            sp.ids,
            list(hooks.values()),
            skip_first=sp.prepend_bos,
            batch_size=batch_size,
            pad_id=pad_id,
        )
        R = random_directions(n_random, int(model.cfg.d_model), seed)
        run = _SweepRun(
            sp, base, ld0, starts, batch_size, pad_id, precision or PrecisionSettings.of({})
        )
        records, per_prompt = [], []
        for L in layers:
            s = scale[hooks[L]]
            dirs = [(source, source, units[L], True)]
            dirs += [("random", f"random_{k:02d}", R[k], False) for k in range(n_random)]
            recs, frames = _sweep_layer(model, run, L, hooks[L], s, dirs, alphas)
            records += recs
            per_prompt += frames
            log(f"layer {L}: scale {s:.3f}; {len(dirs)} directions x {len(alphas)} alphas done")
    norms = pd.DataFrame(
        dict(
            layer=layers,
            hook=[hooks[L] for L in layers],
            scale=[scale[hooks[L]] for L in layers],
            statistic="mean per-token L2 norm of the unsteered residual, BOS left out",
        )
    )
    info = dict(
        n_prompts=n,
        n_neutral=len(sp.neutral_ids),
        layers=layers,
        alphas=alphas,
        component=component,
        position=position,
        source=source,
        n_random=n_random,
        seed=seed,
        unsteered_positive_share=float(np.mean(ld0 > 0)),
    )
    per_prompt_df = pd.concat(per_prompt, ignore_index=True)
    return SteeringResult(_effects_table(records), per_prompt_df, norms, info)


# --------------------------------------------------------------------------------------------
# generation


def _prefill_with_cache(model, ids):
    """(logits, cache) with a KV cache, or (logits, None) where the model cannot fill one.

    Two forward contracts are known: the TransformerBridge (``return_type="logits_and_cache"``)
    and an engine returning the HF output (``return_type="output", use_cache=True``). The bridge of
    TransformerLens 4.3 returns an EMPTY cache for GPT-2 (its own attention does not write HF's
    cache), so the cache is only used when it holds every prompt position.
    """
    import torch

    mask = torch.ones_like(ids)
    if hasattr(model, "adapter"):
        logits, cache = model(
            ids, attention_mask=mask, use_cache=True, return_type="logits_and_cache"
        )
    else:
        out = model(ids, attention_mask=mask, use_cache=True, return_type="output")
        logits, cache = out.logits, out.cache
    ok = (
        cache is not None
        and hasattr(cache, "get_seq_length")
        and int(cache.get_seq_length()) == ids.shape[1]
    )
    return logits, (cache if ok else None)


def _step_with_cache(model, token, cache, total_len: int):
    """One cached decoding step of ``token`` at position ``total_len - 1``."""
    import torch

    B = token.shape[0]
    kw = dict(
        attention_mask=torch.ones((B, total_len), dtype=torch.long, device=token.device),
        position_ids=torch.full((B, 1), total_len - 1, dtype=torch.long, device=token.device),
        cache=cache,  # the pinned transformers' name; past_key_values= is deprecated
        use_cache=True,
    )
    if hasattr(model, "adapter"):
        return model(token, return_type="logits_and_cache", **kw)
    out = model(token, return_type="output", **kw)
    return out.logits, out.cache


def _greedy_group(model, ids, steps: int, hooks_for: Callable, use_cache: bool) -> tuple[Any, bool]:
    """Greedy continuation of equal-length rows ``ids`` ([B, T]); returns ([B, steps] tokens, cache
    used)."""
    import torch

    offset = [0]
    new = []
    with model.hooks(fwd_hooks=hooks_for(offset)):
        if use_cache:
            logits, cache = _prefill_with_cache(model, ids)
        else:
            logits, cache = (
                model(ids, attention_mask=torch.ones_like(ids), return_type="logits"),
                None,
            )
        seq = ids
        for k in range(steps):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            new.append(tok)
            seq = torch.cat([seq, tok], dim=1)
            if k == steps - 1:
                break
            if cache is not None:
                offset[0] = seq.shape[1] - 1
                logits, cache = _step_with_cache(model, tok, cache, seq.shape[1])
            else:
                logits = model(seq, attention_mask=torch.ones_like(seq), return_type="logits")
    return torch.cat(new, dim=1), cache is not None


def generate(
    model,
    rows: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    hook: str | None = None,
    vector=None,
    position: int | str = "all",
    batch_size: int = 64,
    use_cache: bool = True,
    first: int = 0,
) -> tuple[list[list[int]], bool]:
    """Greedy generation of ``max_new_tokens`` for every row, steered by ``vector`` at ``hook`` (or
    not).

    Rows are grouped by token length (no padding at all), so batched equals one row at a time up to
    float rounding. Steering covers every position ``>= start`` of the row, generated ones included.
    Returns the new token ids per row and whether a KV cache was used (see
    :func:`_prefill_with_cache`).
    """
    import torch

    if max_new_tokens < 1:
        return [[] for _ in rows], False
    device = model_device(model)
    out: list[list[int]] = [[] for _ in rows]
    by_len: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_len.setdefault(len(r), []).append(i)
    cached = True
    with torch.inference_mode():
        for T, idx in sorted(by_len.items()):
            for b in range(0, len(idx), batch_size):
                part = idx[b : b + batch_size]
                ids = torch.tensor([list(rows[i]) for i in part], dtype=torch.long, device=device)
                st = torch.as_tensor(row_starts([T] * len(part), position, first), dtype=torch.long)

                def hooks_for(offset, st=st):
                    return [] if hook is None else [(hook, steering_hook(vector, st, offset))]

                toks, used = _greedy_group(model, ids, int(max_new_tokens), hooks_for, use_cache)
                cached = cached and used
                for j, i in enumerate(part):
                    out[i] = toks[j].tolist()
    return out, cached
