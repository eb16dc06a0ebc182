"""Recompute two demo tables from docs/methods.md alone, and compare them with the workflow's.

Imports nothing from ``layerscope``: plain ``transformers`` (GPT2LMHeadModel, torch forward hooks
on its modules), numpy, pandas and h5py, following only the definitions of docs/methods.md:

1. ``results/stats/{model}/{dataset}/activation_stats.csv`` ("Activation statistics"), from pooled
   vectors recomputed with the model ("Caching and pooling": tokens, BOS, mean/last pooling); the
   pooled vectors are also compared with the cached layer files.
2. ``results/patching/{model}/{experiment}/summary.csv`` ("Activation patching"): answer tokens in
   context, the shared prefix appended, LD at the last position, every (component, layer,
   position) and every head at the last position, recovery, and the bootstrap over pairs with its
   generator, draw order and pair order.

Usage (after ``snakemake --cores 2``, from the repository root)::

    python bench/recompute_from_methods.py                       # the demo's tables
    python bench/recompute_from_methods.py --results .test/results --stats-dataset numbers_phase2 \
        --components resid_post --positions 2 --no-heads --model-dir demo/model

Exits 1 if a recomputed value differs from the workflow's by more than the tolerance (values are
compared after the workflow's float32/float64 rounding: 1e-4 relative for statistics, 1e-3
relative for logit differences, recoveries and their intervals, whose engines differ in float
rounding only).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

COMPONENTS = ("resid_pre", "resid_post", "attn_out", "mlp_out")


# --------------------------------------------------------------------------------------------
# tokens (methods: Caching and pooling)


def tokens(tok, text: str, bos: bool) -> list[int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if bos and not (ids and ids[0] == tok.bos_token_id):
        ids = [tok.bos_token_id] + ids
    return ids


# --------------------------------------------------------------------------------------------
# 1. activation statistics from recomputed pooled vectors


def block_outputs(model, ids: list[int], layers) -> dict[int, np.ndarray]:
    """resid_post of each layer = the output of GPT-2 block L, [T, d_model]."""
    got: dict[int, np.ndarray] = {}
    handles = [
        model.transformer.h[L].register_forward_hook(
            lambda m, a, out, L=L: got.__setitem__(L, _first(out)[0].double().numpy())
        )
        for L in layers
    ]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return got


def pooled(model, tok, texts, layers, bos: bool) -> dict[tuple[int, str], np.ndarray]:
    out: dict[tuple[int, str], list] = {(L, p): [] for L in layers for p in ("mean", "last")}
    for text in texts:
        ids = tokens(tok, text, bos)
        h = block_outputs(model, ids, layers)
        first = 1 if bos else 0  # BOS left out of the pooled set
        for L in layers:
            out[(L, "mean")].append(h[L][first:].mean(axis=0))
            out[(L, "last")].append(h[L][-1])
    return {k: np.asarray(v, dtype=np.float32).astype(np.float64) for k, v in out.items()}


def group_stats(x: np.ndarray) -> dict[str, float]:
    return {
        "mean": x.mean(),
        "std": x.std(),
        "min": x.min(),
        "max": x.max(),
        "mean_l2_norm": np.linalg.norm(x, axis=1).mean(),
        "frac_near_zero": np.mean(np.abs(x) < 1e-3),
    }


def stats_rows(X: np.ndarray, labels: np.ndarray, positive: str, key: dict) -> list[dict]:
    classes = sorted(set(labels))
    if positive in classes and len(classes) == 2:
        classes = [c for c in classes if c != positive] + [positive]
    rows, per = [], {}
    for c in classes:
        per[c] = group_stats(X[labels == c])
        rows.append({**key, "label": c, "kind": "label", "n": int((labels == c).sum()), **per[c]})
    rows.append({**key, "label": "<all>", "kind": "all", "n": len(X), **group_stats(X)})
    contrasts = []
    if len(classes) == 2:
        neg, pos = classes
        contrasts.append(("<diff>", labels == pos, labels == neg, per[pos], per[neg]))
    else:
        for c in classes:
            rest = labels != c
            contrasts.append((f"<diff:{c}>", labels == c, rest, per[c], group_stats(X[rest])))
    for label, a, b, sa, sb in contrasts:
        diff = {k: sa[k] - sb[k] for k in sa}
        gap = np.linalg.norm(X[a].mean(axis=0) - X[b].mean(axis=0))
        n = int(a.sum() + b.sum())
        rows.append({**key, "label": label, "kind": "diff", "n": n, **diff, "mean_diff_l2": gap})
    return rows


def check_stats(results: Path, model_name: str, dataset: str, model, tok) -> list[str]:
    prompts = pd.read_csv(results / f"datasets/{dataset}/prompts.csv", dtype=str)
    positive = json.loads((results / f"datasets/{dataset}/summary.json").read_text())
    positive = positive["positive_class"]
    layer_dir = results / f"activations/{model_name}/{dataset}"
    files = sorted(layer_dir.glob("layer_*.h5"), key=lambda p: int(p.stem.split("_")[1]))
    layers = [int(p.stem.split("_")[1]) for p in files]
    with h5py.File(files[0]) as f:
        bos = bool(f.attrs["prepend_bos"])
    mine = pooled(model, tok, prompts["text"].tolist(), layers, bos)
    problems = []
    worst = 0.0
    for path, L in zip(files, layers):
        with h5py.File(path) as f:
            for p in ("mean", "last"):
                cached = f[f"resid_post/{p}"][()].astype(np.float64)
                worst = max(worst, float(np.abs(cached - mine[(L, p)]).max()))
    print(f"pooled vectors vs layer files: max |diff| {worst:.2e}")
    if worst > 1e-4:
        problems.append(f"pooled vectors differ from the layer files by {worst:.2e}")
    rows = []
    for p in ("mean", "last"):
        for L in layers:
            key = {"layer": L, "component": "resid_post", "pooling": p}
            rows += stats_rows(mine[(L, p)], prompts["label"].to_numpy(), positive, key)
    ours = pd.DataFrame(rows)
    theirs = pd.read_csv(results / f"stats/{model_name}/{dataset}/activation_stats.csv")
    keys = ["layer", "component", "pooling", "label"]
    both = theirs.merge(ours, on=keys, suffixes=("", "_mine"), how="outer", indicator=True)
    if (both["_merge"] != "both").any():
        problems.append("activation_stats: rows differ")
    cols = ["n", "mean", "std", "min", "max", "mean_l2_norm", "frac_near_zero", "mean_diff_l2"]
    for c in cols:
        a, b = both[c].to_numpy(float), both[f"{c}_mine"].to_numpy(float)
        bad = ~(np.isclose(a, b, rtol=1e-4, atol=1e-5) | (np.isnan(a) & np.isnan(b)))
        if bad.any():
            problems.append(f"activation_stats.{c}: {int(bad.sum())} of {len(a)} rows differ")
    print(f"activation_stats.csv: {len(theirs)} rows x {len(cols)} columns compared")
    return problems


# --------------------------------------------------------------------------------------------
# 2. the patching summary


def answer_tokens(tok, prompt_ids, prompt: str, answer: str, bos: bool) -> list[int]:
    full = tokens(tok, prompt + answer, bos)
    if len(full) > len(prompt_ids) and full[: len(prompt_ids)] == prompt_ids:
        return full[len(prompt_ids) :]
    return tokens(tok, answer, False)


def prepare(tok, rec, bos: bool):
    cp, kp = tokens(tok, rec.clean, bos), tokens(tok, rec.corrupted, bos)
    ca = answer_tokens(tok, cp, rec.clean, rec.clean_answer, bos)
    ka = answer_tokens(tok, kp, rec.corrupted, rec.corrupted_answer, bos)
    j = next(i for i, (a, b) in enumerate(zip(ca, ka)) if a != b)
    return cp + ca[:j], kp + ca[:j], ca[j], ka[j]


def _where(model, component: str, L: int):
    """(module, pre-hook?) whose input (pre) or output carries the component at layer L."""
    block = model.transformer.h[L]
    return {
        "resid_pre": (block, True),
        "resid_post": (block, False),
        "attn_out": (block.attn, False),
        "mlp_out": (block.mlp, False),
        "z": (block.attn.c_proj, True),  # merged heads before the output projection
    }[component]


def run(model, ids, A, B, grab=None, put=None) -> float:
    """LD = logit_A - logit_B at the last position; ``grab``/``put``: (component, L, fn)."""
    handles = []
    for spec in (grab, put):
        if spec is None:
            continue
        comp, L, fn = spec
        module, pre = _where(model, comp, L)
        if pre:
            handles.append(module.register_forward_pre_hook(lambda m, args, fn=fn: fn(args)))
        else:
            handles.append(module.register_forward_hook(lambda m, a, out, fn=fn: fn(out)))
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double()
    finally:
        for h in handles:
            h.remove()
    return float(logits[A] - logits[B])


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def clean_activation(model, ids, comp, L):
    store = {}

    def grab(x):
        store["v"] = _first(x).clone()

    run(model, ids, 0, 0, grab=(comp, L, grab))
    return store["v"]


def patched_ld(model, ids, A, B, comp, L, src, pos, head, d_head) -> float:
    def put(x):
        t = _first(x).clone()
        if head is None:
            t[0, pos] = src[0, pos]
        else:
            sl = slice(head * d_head, (head + 1) * d_head)
            t[0, pos, sl] = src[0, pos, sl]
        if isinstance(x, tuple):
            return (t,) + tuple(x[1:])
        return t

    return run(model, ids, A, B, put=(comp, L, put))


def pair_cells(model, pair, components, positions, heads):
    clean, corr, A, B = pair
    T = len(clean)
    n_layers, n_heads = model.config.n_layer, model.config.n_head
    d_head = model.config.n_embd // n_heads
    ld_clean, ld_corr = run(model, clean, A, B), run(model, corr, A, B)
    gap = ld_clean - ld_corr
    cells = []
    plist = list(range(T)) if positions == "all" else list(range(max(0, T - positions), T))
    specs = [(c, L, p, None) for c in components for L in range(n_layers) for p in plist]
    if heads:
        specs += [("z", L, T - 1, h) for L in range(n_layers) for h in range(n_heads)]
    cache = {}
    for comp, L, p, h in specs:
        if (comp, L) not in cache:
            cache[(comp, L)] = clean_activation(model, clean, comp, L)
        v = patched_ld(model, corr, A, B, comp, L, cache[(comp, L)], p, h, d_head)
        rec = (v - ld_corr) / gap if abs(gap) >= 1e-6 else np.nan
        head = -1 if h is None else h
        cells.append((comp, L, -1 if comp != "z" else head, p, "logit_diff", v))
        cells.append((comp, L, -1 if comp != "z" else head, p, "recovery", rec))
    return T, cells


def bootstrap_summary(df: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    out = []
    keys = ["component", "layer", "head", "position", "metric"]
    for T, g in df.groupby("n_tokens", sort=True):
        wide = g.pivot_table(
            index="pair_id", columns=keys, values="value", aggfunc="first", dropna=False
        ).sort_index()  # pairs in sorted pair_id order
        X = wide.to_numpy(float)
        n = X.shape[0]
        ok = np.isfinite(X)
        Xz = np.where(ok, X, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = Xz.sum(0) / ok.sum(0)
            if n > 1:
                W = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)
                boot = (W @ Xz) / (W @ ok.astype(float))
                with warnings.catch_warnings():  # cells undefined for every pair stay NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    lo = np.nanquantile(boot, 0.025, axis=0)
                    hi = np.nanquantile(boot, 0.975, axis=0)
            else:
                lo = hi = np.full(X.shape[1], np.nan)
        cells = wide.columns.to_frame(index=False)
        cells["n_tokens"] = T
        cells["mean"], cells["ci_low"], cells["ci_high"], cells["n_pairs"] = mean, lo, hi, ok.sum(0)
        out.append(cells[cells["n_pairs"] > 0])  # cells with no finite value are left out
    return pd.concat(out, ignore_index=True)


def check_patching(results: Path, experiment: str, pairs_file, model, tok, bos, opts) -> list[str]:
    pairs = pd.read_csv(pairs_file, dtype=str, keep_default_na=False)
    rows = []
    for rec in pairs.itertuples(index=False):
        T, cells = pair_cells(
            model, prepare(tok, rec, bos), opts.components, opts.positions, opts.heads
        )
        rows += [(rec.pair_id, T, *c) for c in cells]
    cols = ["pair_id", "n_tokens", "component", "layer", "head", "position", "metric", "value"]
    ours = bootstrap_summary(pd.DataFrame(rows, columns=cols), opts.n_boot, opts.seed)
    theirs = pd.read_csv(results / f"patching/{opts.model_name}/{experiment}/summary.csv")
    keys = ["n_tokens", "component", "layer", "head", "position", "metric"]
    both = theirs.merge(ours, on=keys, suffixes=("", "_mine"), how="outer", indicator=True)
    problems = []
    if (both["_merge"] != "both").any():
        problems.append(f"patching summary: {int((both['_merge'] != 'both').sum())} cells differ")
    for c in ("mean", "ci_low", "ci_high", "n_pairs"):
        a, b = both[c].to_numpy(float), both[f"{c}_mine"].to_numpy(float)
        tol = 1e-3 * np.maximum(1.0, np.abs(a))
        bad = ~((np.abs(a - b) <= tol) | (np.isnan(a) & np.isnan(b)))
        worst = np.nanmax(np.abs(a - b)) if len(a) else 0.0
        print(f"patching summary.{c}: max |diff| {worst:.2e} over {len(a)} cells")
        if bad.any():
            problems.append(f"patching summary.{c}: {int(bad.sum())} of {len(a)} cells differ")
    return problems


def recorded_bos(results: Path, model_name: str) -> bool:
    """The BOS decision, recorded in every activation file (methods: Caching and pooling)."""
    layer_file = next((results / f"activations/{model_name}").rglob("layer_*.h5"))
    with h5py.File(layer_file) as f:
        return bool(f.attrs["prepend_bos"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results")
    ap.add_argument("--model-dir", default="demo/model")
    ap.add_argument("--model-name", default="demo")
    ap.add_argument("--stats-dataset", default="facts_located_in")
    ap.add_argument("--experiment", default="numbers")
    ap.add_argument("--pairs", default="demo/data/patching_pairs.csv")
    ap.add_argument("--components", nargs="+", default=list(COMPONENTS))
    ap.add_argument("--positions", default="all", help="all or the last k")
    ap.add_argument("--no-heads", dest="heads", action="store_false")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    opts = ap.parse_args(argv)
    opts.positions = opts.positions if opts.positions == "all" else int(opts.positions)
    torch.set_num_threads(1)
    model = GPT2LMHeadModel.from_pretrained(opts.model_dir, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(opts.model_dir)
    results = Path(opts.results)
    problems = check_stats(results, opts.model_name, opts.stats_dataset, model, tok)
    bos = recorded_bos(results, opts.model_name)
    problems += check_patching(results, opts.experiment, opts.pairs, model, tok, bos, opts)
    for p in problems:
        print("MISMATCH:", p)
    print("all recomputed values match" if not problems else f"{len(problems)} mismatches")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
