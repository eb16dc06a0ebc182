"""Attribution patching (AtP, AtP*): every cell of the exact sweep estimated from two forward
passes and one backward pass per pair.

For a cell with activation ``a`` (one component at one layer and position, or one head's ``z`` at
one position) the effect of writing the clean activation into the corrupted run is estimated as

    atp = (a_clean - a_corrupted) . dLD/da      (gradient taken on the corrupted run)

where LD is the exact sweep's metric (``logit[clean answer] - logit[corrupted answer]`` at the last
position). ``atp`` is in LD units (an estimate of ``LD_patched - LD_corrupted``); recovery is
``atp / (LD_clean - LD_corrupted)``, NaN when the gap is below ``min_ld_gap`` (as in the sweep).

Engine and taps
---------------
It runs on the native engine (plain ``transformers`` modules, see
:mod:`layerscope.engine.native`): the components are read at the engine's own tap points, and a
head's ``z`` is the input of the attention's output projection (``o_proj`` / ``c_proj`` /
``dense`` / ``out_proj``) viewed as ``[batch, pos, n_heads, d_head]``: the same per-head value,
before the output projection, as TransformerLens's ``blocks.L.attn.hook_z`` that the exact sweep
patches.

Memory
------
The corrupted run starts from a leaf tensor at ``blocks.0.hook_resid_pre``; every tapped activation
gets a tensor hook that, when its gradient arrives in the backward pass, reduces it at once to the
per-cell score ``((a_clean - a_corr) * grad).sum(-1)`` and drops both. What stays is the clean
activations of one batch (one activation cache) and the ``[pairs, positions]`` scores. Pairs are
batched by token length under ``max_tokens_per_batch`` (as in caching).

QK fix (AtP*, Kramar et al. 2024)
---------------------------------
With ``qk_fix`` each head also gets ``k`` (one key position of one key/value head) and ``q`` (one
query position of one query head) cells. Their effect goes through the attention softmax, where the
linear estimate fails when attention saturates. Instead the attention pattern is recomputed exactly
with the clean key (or query) and only the step from the pattern to LD is linearised:
``sum_t,j dLD/dA[t,j] * (A_patched[t,j] - A[t,j])`` with ``dLD/dA[t,j] = dLD/dz_t . v_j``. It reads
the post-rotary queries and keys through a capturing attention function (transformers'
``AttentionInterface``), so the attention is the model's own except for sliding windows, which
are not modelled (a note says so).

GradDrop (AtP*)
---------------
With ``grad_drop`` the backward pass is repeated once per layer with the gradient through that
layer's attention and MLP outputs cut; the score of a cell is then the mean over those runs of
``|atp|`` (a magnitude, against cancellation between paths); ``atp`` itself stays the plain AtP
estimate and ``atp_graddrop`` holds the magnitude. It costs one more backward pass per layer.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from layerscope.engine.loading import hook_name, model_device
from layerscope.engine.native import OUT_PROJ_NAMES, attention_taps, n_heads_of
from layerscope.engine.tokens import resolve_bos
from layerscope.errors import LayerscopeError
from layerscope.interventions import patching as P

__all__ = ["AttributionResult", "attribute", "head_taps", "write_arrays"]

HEAD_COMPONENTS = ("z", "q", "k")
_CAPTURE = "layerscope_capture"


@dataclass
class AttributionResult:
    """What :func:`attribute` returns.

    ``scores[c]``: the AtP estimate in LD units per pair, ``[n_pairs, n_layers, n_pos]`` for a
    component and ``[n_pairs, n_layers, n_heads, n_pos]`` for ``z`` / ``q`` / ``k`` (NaN where a
    cell was not estimated: positions not configured, beyond a pair's length). ``graddrop[c]``: the
    same shapes, the GradDrop magnitude (only with ``grad_drop``). ``pairs``: one row per pair as
    in the exact sweep. ``info``: settings, passes and seconds.
    """

    scores: dict[str, np.ndarray]
    graddrop: dict[str, np.ndarray]
    pairs: pd.DataFrame
    tokens: dict[str, list[str]]
    components: list[str]
    head_components: list[str]
    layers: list[int]
    n_heads: int
    info: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def cells(self) -> pd.DataFrame:
        """Tidy rows as the exact sweep's (``pair_id, n_tokens, layer, position, token,
        component, head, metric, value, ...``): metric ``logit_diff`` is ``LD_corrupted + atp``
        (the estimated patched LD) and ``recovery`` is ``atp / (LD_clean - LD_corrupted)``."""
        return _tidy(self, self.scores)

    def means(
        self, n_boot: int = 1000, seed: int = 0, arrays: dict[str, np.ndarray] | None = None
    ) -> pd.DataFrame:
        """Per cell: ``n_tokens, component, layer, position, head, token, atp, atp_ci_low,
        atp_ci_high, n_pairs``: the mean recovery over the pairs of one token length with a 95 %
        percentile bootstrap over pairs. The same numbers as :func:`patching.summarize` of
        :meth:`cells` (same resamples), computed on the arrays, a block of cells at a time, so
        that hundreds of pairs x 100,000 cells need no tidy table."""
        return _means(self, self.scores if arrays is None else arrays, n_boot, seed)

    def cells_of(self, arrays: dict[str, np.ndarray]) -> pd.DataFrame:
        """:meth:`cells` for other per-pair arrays of the same shapes (the GradDrop ones)."""
        return _tidy(self, arrays)


def head_taps(engine, layer: int):
    """(attention module, output projection) of ``layer`` on the native engine."""
    taps = attention_taps(engine.layers[layer])
    if taps is None:
        raise LayerscopeError(
            f"per-head attribution: layer {layer} of {engine.cfg.architecture} has no attention "
            f"output projection among {OUT_PROJ_NAMES}"
        )
    return taps


def _n_heads(engine) -> int:
    n = n_heads_of(engine.model.config)
    if not n:
        raise LayerscopeError("per-head attribution: the model config names no number of heads")
    return n


# --------------------------------------------------------------------------------------------
# capturing queries, keys and values (QK fix)


_CAPTURED: dict[int, dict[str, Any]] | None = None


def _capture_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The model's attention, recording the post-rotary q, k, v and the scaling of each layer."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    orig = module.config._layerscope_orig_attn
    eager = sys.modules[type(module).__module__].eager_attention_forward
    fn = ALL_ATTENTION_FUNCTIONS.get_interface(orig, eager) if orig != "eager" else eager
    if _CAPTURED is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        _CAPTURED[id(module)] = {"q": query, "k": key, "v": value, "scaling": float(scale)}
    return fn(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


@contextlib.contextmanager
def _capturing(engine, active: bool):
    """Route the model's attention through :func:`_capture_attention` for the block."""
    global _CAPTURED
    if not active:
        yield {}
        return
    from transformers import AttentionInterface

    AttentionInterface.register(_CAPTURE, _capture_attention)
    cfg = engine.model.config
    orig = cfg._attn_implementation or "eager"
    cfg._layerscope_orig_attn = orig
    store: dict[int, dict[str, Any]] = {}
    _CAPTURED = store
    cfg._attn_implementation = _CAPTURE
    try:
        yield store
    finally:
        cfg._attn_implementation = orig
        _CAPTURED = None


# --------------------------------------------------------------------------------------------
# one batch of pairs


@dataclass
class _Plan:
    """What one attribution run estimates."""

    components: list[str]
    heads: bool
    qk_fix: bool
    grad_drop: bool
    layers: list[int]
    n_heads: int
    pos_of: dict[str, list[int]]


def _forward(engine, ids, hooks, pre_hooks, *, leaf: bool):
    """One forward over ``ids`` with TL-named ``hooks`` and torch forward-pre ``pre_hooks``
    ([(module, fn)]); with ``leaf`` the residual stream entering layer 0 becomes a leaf that
    requires grad. Returns (last-position logits, the leaf or None)."""
    import torch

    box: dict[str, Any] = {}

    def make_leaf(x, hook=None):
        box["leaf"] = x.detach().requires_grad_(True)
        return box["leaf"]

    all_hooks = ([(hook_name("resid_pre", 0), make_leaf)] if leaf else []) + list(hooks)
    handles = [m.register_forward_pre_hook(fn) for m, fn in pre_hooks]
    try:
        with engine.hooks(fwd_hooks=all_hooks):
            logits = engine(ids, attention_mask=torch.ones_like(ids), return_type="logits")
    finally:
        for h in handles:
            h.remove()
    return logits[:, -1, :], box.get("leaf")


def _ld(logits, cps):
    """LD per row: logit of the clean answer minus logit of the corrupted answer (float64)."""
    import torch

    rows = torch.arange(len(cps), device=logits.device)
    ct = torch.tensor([p.clean_answer_id for p in cps], device=logits.device)
    kt = torch.tensor([p.corrupted_answer_id for p in cps], device=logits.device)
    return logits[rows, ct].double() - logits[rows, kt].double()


def _z_hook(store: dict, key, n_heads: int):
    """A forward-pre hook on an output projection storing its input as ``[B, T, H, d_head]``."""

    def pre(module, args):
        x = args[0].detach().clone()
        store[key] = x.view(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)

    return pre


def _clean_run(engine, ids, plan: _Plan):
    """The clean forward pass (no grad): (logits, {tap: activation}, {layer: captured qkv})."""
    import torch

    acts: dict[Any, Any] = {}

    def grab(name):
        def fn(x, hook=None):
            acts[name] = x.detach().clone()

        return fn

    hooks = [(hook_name(c, L), grab((c, L))) for c in plan.components for L in plan.layers]
    pre = []
    if plan.heads:
        pre = [
            (head_taps(engine, L)[1], _z_hook(acts, ("z", L), plan.n_heads)) for L in plan.layers
        ]
    with torch.no_grad(), _capturing(engine, plan.qk_fix) as cap:
        logits, _ = _forward(engine, ids, hooks, pre, leaf=False)
        qkv = _qkv_by_layer(engine, plan, cap, detach=True)
    return logits, acts, qkv


def _qkv_by_layer(engine, plan: _Plan, cap, detach: bool):
    """Captured q, k, v per layer (only with the QK fix)."""
    if not plan.qk_fix:
        return {}
    out = {}
    for L in plan.layers:
        rec = cap.get(id(head_taps(engine, L)[0]))
        if rec is None:
            raise LayerscopeError(
                f"QK fix: layer {L}'s attention was not called through the attention interface "
                "(this architecture computes attention itself); set patching.attribution.qk_fix "
                "to false"
            )
        out[L] = {k: (v.detach() if detach and hasattr(v, "detach") else v) for k, v in rec.items()}
    return out


def _score_hook(scores: dict, key, delta, n_heads: int = 0, qk=None):
    """A tensor hook reducing the arriving gradient to ``(delta * grad).sum(-1)`` at once (per
    head for a ``z`` tap, whose tensor is the output projection's input ``[B, T, H * d_head]``);
    ``qk`` (the QK-fix inputs of that layer) also turns the gradient into the q and k scores."""

    def fn(grad):
        g = grad.view(*grad.shape[:-1], n_heads, -1) if n_heads else grad
        d = delta.view(*delta.shape[:-1], n_heads, -1) if n_heads else delta
        scores[key] = (d * g).sum(-1).double()
        if qk is not None:
            scores[("q", key[1])], scores[("k", key[1])] = _qk_scores(g, **qk)

    return fn


def _cut_hook(drop: dict, L: int):
    """A tensor hook zeroing the gradient through layer ``L``'s output while ``drop`` says so."""

    def fn(grad):
        return torch_zeros_like(grad) if drop.get("layer") == L else None

    return fn


def torch_zeros_like(t):
    import torch

    return torch.zeros_like(t)


def _corrupted_run(engine, ids, plan: _Plan, clean, drop: dict):
    """The corrupted forward pass with grad and the score hooks (filled during backward).
    Returns (last-position logits, leaf, scores)."""
    scores: dict[Any, Any] = {}
    acts, clean_qkv = clean

    def tap(key):
        def fn(x, hook=None):
            x.register_hook(_score_hook(scores, key, acts[key] - x.detach()))

        return fn

    def cut(L):
        def fn(x, hook=None):
            x.register_hook(_cut_hook(drop, L))

        return fn

    hooks = [(hook_name(c, L), tap((c, L))) for c in plan.components for L in plan.layers]
    if plan.grad_drop:
        n = int(engine.cfg.n_layers)
        hooks += [(hook_name(c, L), cut(L)) for c in ("attn_out", "mlp_out") for L in range(n)]
    zin: dict[Any, Any] = {}
    pre = []
    if plan.heads:
        pre = [(head_taps(engine, L)[1], _z_input(zin, L)) for L in plan.layers]
    with _capturing(engine, plan.qk_fix) as cap:
        logits, leaf = _forward(engine, ids, hooks, pre, leaf=True)
        qkv = _qkv_by_layer(engine, plan, cap, detach=True)
    for L, x in zin.items():
        qk = dict(corr=qkv[L], clean=clean_qkv[L]) if plan.qk_fix else None
        delta = acts[("z", L)].reshape(x.shape) - x.detach()
        x.register_hook(_score_hook(scores, ("z", L), delta, plan.n_heads, qk))
    return logits, leaf, scores


def _z_input(store: dict, L: int):
    """A forward-pre hook keeping the output projection's input (the flat per-head z)."""

    def pre(module, args):
        store[L] = args[0]

    return pre


def _softmax_rows(scores, causal):
    """Softmax over the last axis with the causal mask (float64)."""
    import torch

    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def _qk_scores(grad_z, corr, clean):
    """QK-fix scores of one layer: (q ``[B, T, H]``, k ``[B, T, H_kv]``), see the module doc.

    ``grad_z``: dLD/dz ``[B, T, H, d]``; ``corr`` / ``clean``: captured ``q [B, H, T, d]``,
    ``k``, ``v`` ``[B, H_kv, T, d]`` and ``scaling``. One query head at a time, so the
    ``[B, T, T]`` float64 temporaries of one head bound the memory (not ``[B, H, T, T]``)."""
    import torch

    H, Hkv, T = corr["q"].shape[1], corr["k"].shape[1], corr["q"].shape[2]
    rep = H // Hkv
    causal = torch.ones(T, T, dtype=torch.bool, device=grad_z.device).tril()
    q_scores, k_scores = [], []
    for h in range(H):
        kv = h // rep  # grouped-query attention: the key/value head this query head reads
        qs, ks = _qk_head(
            grad_z[:, :, h].double(),
            corr["q"][:, h].double(),
            clean["q"][:, h].double(),
            corr["k"][:, kv].double(),
            clean["k"][:, kv].double(),
            corr["v"][:, kv].double(),
            corr["scaling"],
            causal,
        )
        q_scores.append(qs)
        k_scores.append(ks)
    q_score = torch.stack(q_scores, -1)  # [B, T, H]
    k_score = torch.stack(k_scores, -1).view(*q_score.shape[:2], Hkv, rep).sum(-1)
    return q_score, k_score


def _qk_head(gz, q, qc, k, kc, v, s, causal):
    """Query and key scores ``[B, T]`` of one head (all float64 ``[B, T, d]`` inputs)."""
    import torch

    A = _softmax_rows(q @ k.transpose(-1, -2) * s, causal)  # [B, T(query), T(key)]
    g = gz @ v.transpose(-1, -2)  # dLD/dA[t, j] = dLD/dz_t . v_j
    # query patched at t: row t recomputed with the clean query
    q_score = (g * (_softmax_rows(qc @ k.transpose(-1, -2) * s, causal) - A)).sum(-1)
    # key patched at j: the logit (t, j) moves by delta[t, j] for every query t >= j; the new row
    # is A with A_j * e^delta renormalised, written with m = max(0, delta) so nothing overflows
    delta = ((q @ (kc - k).transpose(-1, -2)) * s).masked_fill(~causal, 0.0)
    m = delta.clamp(min=0.0)
    em, ed = torch.exp(-m), torch.exp(delta - m)
    den = (1.0 - A) * em + A * ed
    G = (g * A).sum(-1, keepdim=True)  # sum_j g[t, j] A[t, j]
    k_cell = g * (A * ed / den - A) + (G - g * A) * (em / den - 1.0)
    return q_score, k_cell.masked_fill(~causal, 0.0).sum(1)  # over query positions


# --------------------------------------------------------------------------------------------
# the driver


def _chunks(prepared, max_tokens: int | None) -> list[list[int]]:
    """Pair indices grouped by token length; a chunk holds at most ``max_tokens`` tokens per side
    (at least one pair)."""
    by_len: dict[int, list[int]] = {}
    for i, pp in enumerate(prepared):
        by_len.setdefault(pp.n_tokens, []).append(i)
    out = []
    for T, idx in sorted(by_len.items()):
        per = max(1, int(max_tokens) // T) if max_tokens else len(idx)
        out += [idx[j : j + per] for j in range(0, len(idx), per)]
    return out


def _run_chunk(engine, cps, plan: _Plan, counts: dict):
    """Scores of one chunk: ({kind: [k, ...] array}, {same for GradDrop}, clean LD, corr LD)."""
    import torch

    dev = model_device(engine)
    clean_ids = torch.tensor([p.clean_ids for p in cps], dtype=torch.long, device=dev)
    corr_ids = torch.tensor([p.corrupted_ids for p in cps], dtype=torch.long, device=dev)
    logits_c, acts, qkv = _clean_run(engine, clean_ids, plan)
    clean_ld = _ld(logits_c, cps).detach().cpu().numpy()
    drop: dict[str, Any] = {}
    logits, leaf, scores = _corrupted_run(engine, corr_ids, plan, (acts, qkv), drop)
    del acts
    ld = _ld(logits, cps)
    torch.autograd.grad(ld.sum(), leaf, retain_graph=plan.grad_drop)
    counts["forward"] += 2 * len(cps)  # rows: one clean and one corrupted pass per pair
    counts["backward"] += len(cps)
    plain = _stack(scores, plan)
    gd = {}
    if plan.grad_drop:
        n = int(engine.cfg.n_layers)
        acc = {k: np.zeros_like(v) for k, v in plain.items()}
        for L in range(n):
            drop["layer"] = L
            torch.autograd.grad(ld.sum(), leaf, retain_graph=L < n - 1)
            counts["backward"] += len(cps)
            for k, v in _stack(scores, plan).items():
                acc[k] += np.abs(v)
        gd = {k: v / n for k, v in acc.items()}
    return plain, gd, clean_ld, ld.detach().cpu().numpy()


def _stack(scores: dict, plan: _Plan) -> dict[str, np.ndarray]:
    """Per cell kind, the chunk's scores stacked over layers: ``[k, L, T]`` or ``[k, L, H, T]``."""
    import torch

    missing = [k for k in _expected(plan) if k not in scores]
    if missing:
        raise LayerscopeError(
            f"attribution: no gradient reached {missing[:3]} (the tap is not on the path from "
            "the input to the logits for this architecture)"
        )
    out = {}
    for c in plan.components:
        out[c] = torch.stack([scores[(c, L)] for L in plan.layers], 1).cpu().numpy()
    for c in _head_kinds(plan):
        out[c] = torch.stack([scores[(c, L)] for L in plan.layers], 1).transpose(2, 3)
        out[c] = out[c].cpu().numpy()
    return out


def _expected(plan: _Plan) -> list[tuple[str, int]]:
    """Every (kind, layer) score the backward pass must deliver."""
    return [(c, L) for c in plan.components + _head_kinds(plan) for L in plan.layers]


def _head_kinds(plan: _Plan) -> list[str]:
    return (["z"] + (["q", "k"] if plan.qk_fix else [])) if plan.heads else []


def _place(arrays: dict, part: dict, rows: list[int], cps, plan: _Plan) -> None:
    """Write a chunk's scores into the result arrays at the configured positions only."""
    for c, v in part.items():
        for slot, (row, pp) in enumerate(zip(rows, cps)):
            pos = plan.pos_of[pp.pair_id]
            arrays[c][row, ..., pos] = v[slot, ..., pos]


def _alloc(kinds_shape: dict, n_pairs: int, n_pos: int) -> dict[str, np.ndarray]:
    return {c: np.full((n_pairs, *shape, n_pos), np.nan) for c, shape in kinds_shape.items()}


def _check_components(engine, components, heads: bool, qk_fix: bool) -> None:
    """Components the native engine taps; heads and the QK fix need an output projection."""
    if not hasattr(engine, "layout"):
        raise LayerscopeError(
            "attribution patching runs on the native engine (engine: native or auto); "
            "this model was loaded on the bridge"
        )
    for c in components:
        if c not in P.COMPONENTS or c == "resid_mid":
            raise LayerscopeError(f"attribution: component {c!r} is not patchable")
        if hook_name(c, 0) not in engine.hook_dict:
            raise LayerscopeError(f"attribution: component {c!r} has no native tap for this model")
    if qk_fix and not heads:
        raise LayerscopeError("attribution: the QK fix applies to heads; it needs heads: true")
    if not components and not heads:
        raise LayerscopeError("attribution: nothing to estimate (no components, no heads)")


def attribute(
    engine,
    pairs,
    *,
    components: Sequence[str] = ("resid_pre", "resid_post", "attn_out", "mlp_out"),
    positions: str | int | Sequence[int] = "all",
    heads: bool = True,
    qk_fix: bool = False,
    grad_drop: bool = False,
    max_tokens_per_batch: int | None = 4096,
    prepend_bos: bool | str = "auto",
    min_ld_gap: float = 1e-6,
    log: Callable[[str], Any] | None = None,
) -> AttributionResult:
    """Estimate every cell of the exact sweep (every layer; ``positions``; ``components``; each
    head's z at every configured position) by attribution patching; see the module doc.

    Pairs are tokenized and checked exactly as by :func:`patching.prepare_pairs` (clean and
    corrupted inputs of different token lengths are refused naming the pair)."""
    import torch

    log = log or (lambda msg: None)
    components = list(components)
    _check_components(engine, components, heads, qk_fix)
    pairs_df = P.pairs_input(pairs)
    prepend = resolve_bos(engine.tokenizer, prepend_bos)
    prepared = P.prepare_pairs(engine.tokenizer, pairs_df, prepend_bos=prepend)
    n_ctx = int(getattr(engine.cfg, "n_ctx", 0) or 0)
    for pp in prepared:
        if n_ctx and pp.n_tokens > n_ctx:
            raise LayerscopeError(
                f"pair {pp.pair_id!r} has {pp.n_tokens} tokens, more than the model context {n_ctx}"
            )
    layers = list(range(int(engine.cfg.n_layers)))
    n_heads = _n_heads(engine) if heads else 0
    pos_of = {p.pair_id: P.resolve_positions(positions, p.n_tokens, p.pair_id) for p in prepared}
    plan = _Plan(components, heads, qk_fix, grad_drop, layers, n_heads, pos_of)
    n_pos, n = max(p.n_tokens for p in prepared), len(prepared)
    shapes = {c: (len(layers),) for c in components}
    if heads:
        n_kv = _n_kv_heads(engine)
        shapes.update({"z": (len(layers), n_heads)})
        if qk_fix:
            shapes.update({"q": (len(layers), n_heads), "k": (len(layers), n_kv)})
    scores, gd = _alloc(shapes, n, n_pos), (_alloc(shapes, n, n_pos) if grad_drop else {})
    ld = np.full((n, 2), np.nan)
    counts = {"forward": 0, "backward": 0}
    t0, done = time.perf_counter(), 0
    for rows in _chunks(prepared, max_tokens_per_batch):
        cps = [prepared[i] for i in rows]
        with torch.enable_grad():
            plain, drop, clean_ld, corr_ld = _run_chunk(engine, cps, plan, counts)
        _place(scores, plain, rows, cps, plan)
        _place(gd, drop, rows, cps, plan)
        ld[rows, 0], ld[rows, 1] = clean_ld, corr_ld
        done += len(rows)
        log(f"attribution: {done}/{n} pairs, {time.perf_counter() - t0:.1f} s")
    seconds = time.perf_counter() - t0
    return _result(engine, prepared, plan, scores, gd, ld, counts, seconds, min_ld_gap, prepend)


def _n_kv_heads(engine) -> int:
    cfg = engine.model.config
    kv = getattr(cfg, "num_key_value_heads", None)
    return int(kv) if isinstance(kv, int) and kv > 0 else _n_heads(engine)


def _result(engine, prepared, plan, scores, gd, ld, counts, seconds, min_ld_gap, prepend):
    """Assemble the :class:`AttributionResult` (pairs table, settings, passes and seconds)."""
    from layerscope.engine.loading import describe_model

    notes = []
    pairs = pd.DataFrame(
        [P.pair_row(engine.tokenizer, pp, ld[i, 0], ld[i, 1]) for i, pp in enumerate(prepared)]
    )
    for i, pp in enumerate(prepared):
        if abs(ld[i, 0] - ld[i, 1]) < min_ld_gap:
            notes.append(f"pair {pp.pair_id!r}: clean and corrupted LD are equal; recovery NaN")
    if plan.qk_fix and getattr(engine.model.config, "sliding_window", None):
        notes.append("QK fix: the model's sliding window is not modelled (full causal softmax)")
    n = len(prepared)
    info = describe_model(engine)
    info.update(
        method="attribution",
        qk_fix=plan.qk_fix,
        grad_drop=plan.grad_drop,
        prepend_bos=bool(prepend),
        min_ld_gap=float(min_ld_gap),
        seconds=seconds,
        seconds_per_pair=seconds / n,
        n_forward_passes=counts["forward"],
        n_backward_passes=counts["backward"],
        forward_passes_per_pair=counts["forward"] / n,
        backward_passes_per_pair=counts["backward"] / n,
    )
    return AttributionResult(
        scores=scores,
        graddrop=gd,
        pairs=pairs,
        tokens={p.pair_id: p.clean_tokens for p in prepared},
        components=list(plan.components),
        head_components=_head_kinds(plan),
        layers=list(plan.layers),
        n_heads=plan.n_heads,
        info=info,
        notes=notes,
    )


def _tidy(res: AttributionResult, arrays: dict[str, np.ndarray]) -> pd.DataFrame:
    """Rows per (pair, cell) with the exact sweep's columns, from the per-pair arrays."""
    parts = []
    clean = res.pairs["clean_logit_diff"].to_numpy(dtype=np.float64)
    corr = res.pairs["corrupted_logit_diff"].to_numpy(dtype=np.float64)
    gap = clean - corr
    for c, arr in arrays.items():
        head_axis = arr.ndim == 4
        idx = np.argwhere(np.isfinite(arr))  # [n, 3 or 4]: pair, layer, (head,) position
        vals = arr[tuple(idx.T)]
        pi, li, pos = idx[:, 0], idx[:, 1], idx[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            rec = np.where(np.abs(gap[pi]) < res.info["min_ld_gap"], np.nan, vals / gap[pi])
        base = pd.DataFrame(
            {
                "pair_id": res.pairs["pair_id"].to_numpy()[pi],
                "n_tokens": res.pairs["n_tokens"].to_numpy()[pi],
                "layer": np.asarray(res.layers)[li],
                "position": pos,
                "token": [res.tokens[res.pairs["pair_id"].iat[i]][p] for i, p in zip(pi, pos)],
                "component": c,
                "head": idx[:, 2] if head_axis else -1,
                "clean_logit_diff": clean[pi],
                "corrupted_logit_diff": corr[pi],
            }
        )
        parts.append(base.assign(metric="logit_diff", value=corr[pi] + vals))
        parts.append(base.assign(metric="recovery", value=rec))
    df = pd.concat(parts, ignore_index=True)
    df["head"] = df["head"].astype("int64")
    return df[list(P.RESULT_COLUMNS)]


def write_arrays(res: AttributionResult, table: pd.DataFrame, path) -> None:
    """The per-pair arrays (atomically): ``atp/<kind>`` (LD units, ``[n_pairs, n_layers,
    n_positions]`` or ``[n_pairs, n_layers, n_heads, n_positions]``), ``graddrop/<kind>`` with
    GradDrop, ``pair_id``, ``n_tokens``, ``clean_logit_diff``, ``corrupted_logit_diff``,
    ``layers``; attrs: settings, passes and seconds."""
    import json

    import h5py

    from layerscope.atomic import atomic_path

    str_dt = h5py.string_dtype("utf-8")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("pair_id", data=res.pairs["pair_id"].to_numpy(dtype=object), dtype=str_dt)
        f.create_dataset("n_tokens", data=res.pairs["n_tokens"].to_numpy(dtype=np.int64))
        for col in ("clean_logit_diff", "corrupted_logit_diff"):
            f.create_dataset(col, data=res.pairs[col].to_numpy(dtype=np.float64))
        f.create_dataset("layers", data=np.asarray(res.layers, dtype=np.int64))
        for group, arrays in (("atp", res.scores), ("graddrop", res.graddrop)):
            for kind, arr in arrays.items():
                f.create_dataset(f"{group}/{kind}", data=arr, compression="gzip")
        for k, v in res.info.items():
            ok = isinstance(v, (int, float, str, bool, np.integer, np.floating))
            f.attrs[k] = v if ok else json.dumps(v, default=str)
        f.attrs["notes"] = json.dumps(res.notes)
        f.attrs["n_verified"] = int(table["verified"].sum())
        f.attrs["kind"] = "attribution"


def _boot_block(X: np.ndarray, W: np.ndarray | None, block: int = 20_000):
    """Mean over rows (NaN left out), and the 2.5 / 97.5 % quantiles of the resampled means."""
    import warnings

    valid = np.isfinite(X)
    Xz = np.where(valid, X, 0.0)
    cnt = valid.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = Xz.sum(0) / cnt
    lo = np.full(X.shape[1], np.nan)
    hi = np.full(X.shape[1], np.nan)
    if W is None:
        return mean, lo, hi, cnt
    for j in range(0, X.shape[1], block):
        sl = slice(j, j + block)
        with np.errstate(invalid="ignore", divide="ignore"):
            boot = (W @ Xz[:, sl]) / (W @ valid[:, sl].astype(np.float64))
        with warnings.catch_warnings():  # all-NaN cells (undefined recovery) stay NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            lo[sl] = np.nanquantile(boot, 0.025, axis=0)
            hi[sl] = np.nanquantile(boot, 0.975, axis=0)
    return mean, lo, hi, cnt


def _means(res: AttributionResult, arrays: dict[str, np.ndarray], n_boot: int, seed: int):
    """See :meth:`AttributionResult.means`."""
    rng = np.random.default_rng(seed)
    gap = (res.pairs["clean_logit_diff"] - res.pairs["corrupted_logit_diff"]).to_numpy(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        inv = np.where(np.abs(gap) < res.info["min_ld_gap"], np.nan, 1.0 / gap)
    n_tokens = res.pairs["n_tokens"].to_numpy()
    pids = res.pairs["pair_id"].tolist()
    parts = []
    for n_tok in sorted(set(n_tokens.tolist())):
        rows = np.flatnonzero(n_tokens == n_tok)
        n = len(rows)
        W = None
        if n_boot > 0 and n > 1:
            W = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
        labels = [
            P.merge_token_labels([res.tokens[pids[i]][p] for i in rows], False)
            for p in range(n_tok)
        ]
        for kind, arr in arrays.items():
            sub = arr[rows][..., :n_tok]
            rec = sub * inv[rows].reshape((n,) + (1,) * (sub.ndim - 1))
            mean, lo, hi, cnt = _boot_block(rec.reshape(n, -1), W)
            keep = np.flatnonzero(cnt > 0)
            idx = np.unravel_index(keep, sub.shape[1:])
            parts.append(
                pd.DataFrame(
                    {
                        "n_tokens": int(n_tok),
                        "component": kind,
                        "layer": np.asarray(res.layers)[idx[0]],
                        "position": idx[-1],
                        "head": idx[1] if sub.ndim == 4 else -1,
                        "token": [labels[p] for p in idx[-1]],
                        "atp": mean[keep],
                        "atp_ci_low": lo[keep],
                        "atp_ci_high": hi[keep],
                        "n_pairs": cnt[keep],
                    }
                )
            )
    out = pd.concat(parts, ignore_index=True)
    out["head"] = out["head"].astype("int64")
    return out
