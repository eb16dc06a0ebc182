"""Readouts along the chain of thought: logit lens, tuned lens and probe trajectories.

One forward pass per batch of prompts gives every readout. The hooks keep the residual stream of
the batch (``resid_post`` of every layer, plus the components the probes read): layers x tokens x
d_model, what the forward pass itself holds. Vocabulary-sized logits exist only for ``chunk``
positions of one prompt at a time, so memory never grows with vocabulary x positions; only the
answer token's log-probability and rank, the top-k and the KL to the final layer are kept.

Positions
---------
The readout at position ``p`` is the next-token distribution there: it predicts token ``p + 1``.
With ``r`` the first reasoning token and ``a`` the answer's first token
(:mod:`layerscope.data.cot`), the lens runs over positions ``0 .. a - 1`` (position ``a - 1``
writes the answer) and ``rel_position = (p + 1 - r) / (a - r)``: 0 where the first reasoning token
is predicted, 1 where the answer is, negative inside the question. Probes read every position of
the prompt (their ``rel_position`` goes past 1 over the answer's own tokens).

Lens
----
``logit``: the model's final norm and unembedding applied to ``resid_post`` of each layer (its
last layer is the model's own output; :func:`final_readout` checks that per job). ``tuned``: the
same after an affine translator per layer (:mod:`layerscope.analysis.tuned_lens`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from layerscope.engine.loading import hook_name, model_device
from layerscope.engine.tokens import make_batches
from layerscope.errors import LayerscopeError

#: attribute names of the final norm on a causal LM's base model (first found wins)
_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")
LENS_COLUMNS = (
    "prompt_id",
    "label",
    "lens",
    "layer",
    "position",
    "rel_position",
    "answer_logprob",
    "answer_rank",
    "top1_id",
    "top1_logprob",
    "kl_to_final",
)


def hf_model(model):
    """The plain transformers model under a TransformerBridge or the native engine."""
    return getattr(model, "original_model", None) or model.model


def final_readout(model) -> Callable:
    """``h -> logits``: the final norm, LM head and (Gemma 2) logit soft-capping of ``model``.

    Raises when the model's layout has no final norm under a known name; the job checks the result
    against the model's own logits (:func:`check_readout`)."""
    import torch

    hf = hf_model(model)
    base = getattr(hf, hf.base_model_prefix, hf)
    norm = next((getattr(base, n) for n in _FINAL_NORMS if hasattr(base, n)), None)
    if norm is None:
        raise LayerscopeError(
            f"logit lens: no final norm found on {type(base).__name__} (looked for "
            f"{', '.join(_FINAL_NORMS)})"
        )
    head = hf.get_output_embeddings()
    cap = getattr(hf.config, "final_logit_softcapping", None)

    def readout(h):
        w = head.weight
        logits = head(norm(h.to(w.dtype))).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return readout


@dataclass(frozen=True)
class ProbeView:
    """A trained binary probe: ``score = x @ coef + intercept`` on ``component`` of ``layer``."""

    name: str
    dataset: str
    layer: int
    component: str
    pooling: str
    coef: np.ndarray
    intercept: float
    positive: str


def probe_view(doc: Mapping[str, Any], component: str, pooling: str, path: str) -> ProbeView:
    """The (component, pooling) probe of a probe JSON (``results/probes/{model}/{dataset}/
    layer_{L}.json``); a view the file lacks or a multi-class probe is an error naming it."""
    for p in doc.get("probes", []):
        if p["component"] == component and p["pooling"] == pooling:
            res = p["result"]
            if len(res["coef"]) != 1:
                raise LayerscopeError(f"{path}: probe trajectories need a binary probe")
            name = f"{doc['dataset']}_L{doc['layer']}_{component}_{pooling}"
            return ProbeView(
                name=name,
                dataset=str(doc["dataset"]),
                layer=int(doc["layer"]),
                component=component,
                pooling=pooling,
                coef=np.asarray(res["coef"][0], dtype=np.float64),
                intercept=float(res["intercept"][0]),
                positive=str(res["classes"][1]),
            )
    raise LayerscopeError(f"{path}: no probe for component {component!r}, pooling {pooling!r}")


@dataclass
class Prompt:
    """One prompt's token ids and where its lens stops (``n_lens`` = answer start ``a``)."""

    ids: np.ndarray
    n_lens: int
    answer_token: int


@dataclass
class Readouts:
    """Per-prompt arrays: ``lens[name][key]`` is ``[n_layers, n_lens]`` (top-k: ``[..., k]``);
    ``probes`` is ``[n_probes, n_tokens]``."""

    lens: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    probes: np.ndarray | None = None


def _capture(store: dict, key):
    def hook(tensor, hook=None):
        store[key] = tensor.detach()
        return None

    return hook


def _forward_batch(model, prompts: Sequence[Prompt], hooks: list, pad_id: int):
    """One right-padded forward pass with ``hooks``; its final norm and LM head run on nothing."""
    import torch

    device = model_device(model)
    T = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, : len(p.ids)] = torch.as_tensor(p.ids)
        mask[r, : len(p.ids)] = 1
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model(ids.to(device), attention_mask=mask.to(device), return_type=None)


def _lens_rows(lp, final, tok: int, top_k: int) -> dict[str, Any]:
    """Answer log-prob, rank, top-k and KL(final || lens) of log-probs ``lp`` ``[c, V]``."""
    import torch

    # A copy, not a view: a view would keep this layer's [chunk, vocabulary] log-probs alive
    # until the chunk is done.
    target = lp[:, tok].clone()
    rank = 1 + (lp > target[:, None]).sum(dim=-1)
    top = torch.topk(lp, top_k, dim=-1)
    kl = (final.exp() * (final - lp)).sum(dim=-1)
    return {
        "answer_logprob": target,
        "answer_rank": rank,
        "topk_ids": top.indices,
        "topk_logprobs": top.values,
        "kl_to_final": kl,
    }


def _prompt_lens(resid, row: int, p: Prompt, readout, translators, top_k: int, chunk: int):
    """Every lens of one prompt, ``chunk`` positions at a time."""
    import torch

    n_layers = len(resid)
    parts: dict[str, dict[str, list]] = {name: {} for name in ["logit", *translators]}
    with torch.no_grad():
        _fill_lens(parts, resid, row, p, readout, translators, top_k, chunk, n_layers)
    return {name: {k: np.concatenate(v, axis=1) for k, v in d.items()} for name, d in parts.items()}


def _fill_lens(parts, resid, row, p, readout, translators, top_k, chunk, n_layers) -> None:
    import torch

    for s in range(0, p.n_lens, chunk):
        e = min(s + chunk, p.n_lens)
        final = torch.log_softmax(readout(resid[n_layers - 1][row, s:e]), dim=-1)
        for name in parts:
            per_layer = []
            for L in range(n_layers):
                h = resid[L][row, s:e]
                if name != "logit":
                    h = translators[name](L, h)
                lp = torch.log_softmax(readout(h), dim=-1)
                per_layer.append(_lens_rows(lp, final, p.answer_token, top_k))
            for key in per_layer[0]:
                stacked = torch.stack([d[key] for d in per_layer]).cpu().numpy()
                parts[name].setdefault(key, []).append(stacked)


def _probe_scores(captured, row: int, n: int, probes: Sequence[ProbeView]) -> np.ndarray:
    """``[n_probes, n]`` probe scores at every position of one prompt (float64, as the probes)."""
    out = np.empty((len(probes), n), dtype=np.float64)
    for j, pv in enumerate(probes):
        x = captured[(pv.component, pv.layer)][row, :n].double().cpu().numpy()
        out[j] = x @ pv.coef + pv.intercept
    return out


def capture_batches(
    model,
    prompts: Sequence[Prompt],
    keys,
    *,
    batch_size: int,
    max_tokens_per_batch: int | None = None,
    pad_id: int = 0,
):
    """Yield ``(prompt indices, {(component, layer): [B, T, d]})`` for each length-sorted batch:
    one forward pass each, the activations of ``keys`` kept on the model's device."""
    lengths = [len(p.ids) for p in prompts]
    for batch in make_batches(lengths, batch_size, max_tokens_per_batch):
        captured: dict = {}
        hooks = [(hook_name(c, L), _capture(captured, (c, L))) for c, L in sorted(keys)]
        _forward_batch(model, [prompts[i] for i in batch], hooks, pad_id)
        missing = [k for k in keys if k not in captured]
        if missing:
            raise LayerscopeError(f"hooks did not fire: {missing[:5]}")
        yield batch, captured


def run_readouts(
    model,
    prompts: Sequence[Prompt],
    *,
    n_layers: int,
    top_k: int = 5,
    chunk: int = 256,
    translators: Mapping[str, Callable] | None = None,
    probes: Sequence[ProbeView] = (),
    batch_size: int = 8,
    max_tokens_per_batch: int | None = None,
    pad_id: int = 0,
    readout: Callable | None = None,
) -> list[Readouts]:
    """Every readout of every prompt, from one forward pass per batch (prompt order kept).

    ``translators``: lens name -> ``f(layer, h)`` (e.g. ``{"tuned": ...}``); the logit lens is
    always computed. Batched equals unbatched up to float noise (right padding, causal model).
    """
    readout = readout or final_readout(model)
    translators = dict(translators or {})
    keys = {("resid_post", L) for L in range(n_layers)} | {(p.component, p.layer) for p in probes}
    for _, L in keys:
        if not 0 <= L < n_layers:
            raise LayerscopeError(
                f"probe layer {L} is not a layer of the model (0..{n_layers - 1})"
            )
    out: list[Readouts | None] = [None] * len(prompts)
    for batch, captured in capture_batches(
        model,
        prompts,
        keys,
        batch_size=batch_size,
        max_tokens_per_batch=max_tokens_per_batch,
        pad_id=pad_id,
    ):
        resid = [captured[("resid_post", L)] for L in range(n_layers)]
        for row, i in enumerate(batch):
            p = prompts[i]
            lens = _prompt_lens(resid, row, p, readout, translators, top_k, chunk)
            scores = _probe_scores(captured, row, len(p.ids), probes) if probes else None
            out[i] = Readouts(lens=lens, probes=scores)
        del captured, resid
    return out  # type: ignore[return-value]


def check_readout(
    model, prompts: Sequence[Prompt], readout, n_layers: int, atol: float, max_positions: int = 256
) -> float:
    """Largest |final-layer lens log-prob - the model's own log-prob| over the first
    ``max_positions`` lens positions of ``prompts`` (one at a time, the model's own forward pass
    with its LM head: vocabulary x ``max_positions`` logits); raises above ``atol``."""
    import torch

    worst = 0.0
    device = model_device(model)
    for p in prompts:
        n = min(p.n_lens, max_positions)
        p = Prompt(p.ids[:n], n, p.answer_token)
        ids = torch.as_tensor(p.ids[: p.n_lens], device=device)[None]
        own = torch.log_softmax(_own_logits(model, ids)[0].float(), dim=-1)
        got = run_readouts(model, [p], n_layers=n_layers, top_k=1, readout=readout)[0]
        mine = got.lens["logit"]["answer_logprob"][n_layers - 1]
        ref = own[: p.n_lens, p.answer_token].cpu().numpy()
        worst = max(worst, float(np.max(np.abs(mine - ref))))
    if worst > atol:
        raise LayerscopeError(
            f"logit lens: the last layer's readout differs from the model's own log-probs by "
            f"{worst:.3g} (> {atol}); this architecture's final norm / unembedding is not the "
            "one layerscope applies"
        )
    return worst


def _own_logits(model, ids):
    import torch

    with torch.no_grad():
        mask = torch.ones_like(ids)
        return model(ids, attention_mask=mask, return_type="logits")


# --------------------------------------------------------------------------------------------
# tables


def rel_positions(n: int, r: int, a: int) -> np.ndarray:
    """rel_position of positions ``0 .. n - 1`` (see the module docstring)."""
    return (np.arange(n) + 1 - r) / max(a - r, 1)


def lens_table(
    results: Sequence[Readouts], positions: pd.DataFrame, layers: Sequence[int]
) -> pd.DataFrame:
    """lens.csv: one row per (prompt, lens, layer, position) of the layers asked for."""
    frames = []
    for res, rec in zip(results, positions.itertuples(index=False)):
        a, r = int(rec.answer_start_token), int(rec.reasoning_start_token)
        rel = rel_positions(a, r, a)
        for name, d in res.lens.items():
            for L in layers:
                frames.append(
                    pd.DataFrame(
                        {
                            "prompt_id": rec.prompt_id,
                            "label": rec.label,
                            "lens": name,
                            "layer": L,
                            "position": np.arange(a),
                            "rel_position": rel,
                            "answer_logprob": d["answer_logprob"][L],
                            "answer_rank": d["answer_rank"][L],
                            "top1_id": d["topk_ids"][L][:, 0],
                            "top1_logprob": d["topk_logprobs"][L][:, 0],
                            "kl_to_final": d["kl_to_final"][L],
                        }
                    )
                )
    return pd.concat(frames, ignore_index=True)[list(LENS_COLUMNS)]


def probe_table(
    results: Sequence[Readouts], positions: pd.DataFrame, probes: Sequence[ProbeView]
) -> pd.DataFrame:
    """probe_trajectories.csv: one row per (prompt, probe, position)."""
    cols = ["prompt_id", "label", "probe", "probe_dataset", "layer", "component", "pooling"]
    cols += ["position", "rel_position", "score"]
    frames = []
    for res, rec in zip(results, positions.itertuples(index=False)):
        n = int(rec.n_tokens)
        rel = rel_positions(n, int(rec.reasoning_start_token), int(rec.answer_start_token))
        for j, pv in enumerate(probes):
            frames.append(
                pd.DataFrame(
                    {
                        "prompt_id": rec.prompt_id,
                        "label": rec.label,
                        "probe": pv.name,
                        "probe_dataset": pv.dataset,
                        "layer": pv.layer,
                        "component": pv.component,
                        "pooling": pv.pooling,
                        "position": np.arange(n),
                        "rel_position": rel,
                        "score": res.probes[j],
                    }
                )
            )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def rel_bin(rel: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each rel_position: -1 for the question, 0 .. n_bins - 1 over the reasoning
    [0, 1), and n_bins for the answer-writing position (rel_position 1) on its own."""
    rel = np.asarray(rel, dtype=float)
    b = np.clip(np.floor(rel * n_bins).astype(int), 0, n_bins - 1)
    return np.where(rel < 0, -1, np.where(rel >= 1.0, n_bins, b))


def summarize_lens(lens: pd.DataFrame, n_bins: int, conf: float) -> pd.DataFrame:
    """lens_summary.csv: per (lens, layer, bin, label) the mean over prompts of each prompt's
    mean answer log-prob in the bin, with a t interval (prompts are the unit), and the share of
    positions where the answer is the top token."""
    from layerscope.analysis.power import t_half_width

    df = lens.assign(bin=rel_bin(lens["rel_position"].to_numpy(), n_bins))
    per_prompt = (
        df.assign(top1=df["answer_rank"] == 1)
        .groupby(["lens", "layer", "bin", "label", "prompt_id"], sort=True)
        .agg(logprob=("answer_logprob", "mean"), top1=("top1", "mean"))
        .reset_index()
    )
    rows = []
    for (name, L, b, label), g in per_prompt.groupby(["lens", "layer", "bin", "label"]):
        x = g["logprob"].to_numpy()
        n = len(x)
        hw = t_half_width(float(x.std(ddof=1)), n, conf) if n > 1 else math.nan
        lo, hi = (-math.inf, 0.0) if b < 0 else (b / n_bins, min(b + 1, n_bins) / n_bins)
        rows.append(
            {
                "lens": name,
                "layer": int(L),
                "bin": int(b),
                "bin_low": lo,
                "bin_high": hi,
                "label": label,
                "n_prompts": n,
                "mean_logprob": float(x.mean()),
                "ci_low": float(x.mean() - hw),
                "ci_high": float(x.mean() + hw),
                "top1_share": float(g["top1"].mean()),
            }
        )
    return pd.DataFrame(rows)


def kl_table(lens: pd.DataFrame, split: Mapping[str, str]) -> pd.DataFrame:
    """lens_kl.csv: mean KL(final || lens) per (lens, layer, split): ``split`` maps prompt ids
    to train / heldout (the tuned lens's training prompts); every prompt is heldout without one."""
    df = lens.assign(split=lens["prompt_id"].map(split).fillna("heldout"))
    g = df.groupby(["lens", "layer", "split"], sort=True)["kl_to_final"]
    out = g.agg(mean_kl="mean", median_kl="median", n_positions="size").reset_index()
    return out
