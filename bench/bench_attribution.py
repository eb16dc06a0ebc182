"""Benchmark: attribution patching against exact patching of every cell, side by side in one run.

For each model shape (a 6-layer GPT-2 and a 28-layer Qwen2 with 12 query / 2 key-value heads, the
shape of DeepSeek-R1-Distill-Qwen-1.5B with a small d_model so it fits a CPU), one clean/corrupted
pair of ``--tokens`` tokens (>= 500 by default) and the full sweep: every layer, every position,
the components resid_pre, attn_out, mlp_out, resid_post and every head's z at every position.

* attribution: :func:`layerscope.interventions.attribution.attribute` on the native engine, with
  the QK fix (q and k cells too) and, separately, without it; seconds, peak memory above the loaded
  model, forward-equivalents (its seconds over the seconds of one plain forward pass of the pair);
* exact: the exact sweep (:func:`layerscope.interventions.patching.patch_sweep`, on the bridge, as
  the workflow runs it with heads) of a uniform random subset of ``--exact-cells`` cells. Its time
  for the full sweep is EXTRAPOLATED: seconds per patched cell x the cells the sweep would run
  (cells before the first differing position are skipped by the sweep, as identical). The output
  says so.

Also reported: Spearman of attribution vs exact recovery on the measured subset, per component.

Run ``python bench/bench_attribution.py`` (``--quick`` for a small smoke run, ``--device cuda``
on a GPU). Results are printed as a table and written as JSON with ``--json PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "gpt2-6L": dict(arch="gpt2", n_layers=6, d_model=128, n_heads=4),
    "qwen2-28L": dict(arch="qwen2", n_layers=28, d_model=96, n_heads=12, n_kv_heads=2),
}
QUICK = {
    "gpt2-6L": dict(arch="gpt2", n_layers=6, d_model=64, n_heads=4),
    "qwen2-28L": dict(arch="qwen2", n_layers=28, d_model=48, n_heads=12, n_kv_heads=2),
}
# DeepSeek-R1-Distill-Qwen-1.5B's widths (d_model 1536, 12/2 heads, MLP 8960), vocabulary of the
# tiny tokenizer: where the matmuls, not the per-hook Python work, set the time (``--wide``).
WIDE = {
    "qwen2-28L-wide": dict(
        arch="qwen2", n_layers=28, d_model=1536, n_heads=12, n_kv_heads=2, d_mlp=8960
    ),
}
COMPONENTS = ["resid_pre", "attn_out", "mlp_out", "resid_post"]


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator peak, else sampled RSS (5 ms)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base, self._stop = self._rss(), False
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop:
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(0.005)

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop = True
            self._thread.join()
            self.peak = max(self.peak, self._rss() - self.base)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(shape: dict, tokens: int, root: Path) -> tuple[Path, dict]:
    """A tiny model of ``shape`` with context for the pair, and a pair of about ``tokens``."""
    from devkit.tiny_models import build_tiny_model

    kv = shape.get("n_kv_heads", "")
    path = root / f"{shape['arch']}-{shape['n_layers']}-{shape['d_model']}-{shape['n_heads']}{kv}"
    if not (path / "config.json").exists():
        build_tiny_model(path, n_positions=tokens + 64, seed=0, **shape)
    unit = "Which is larger: 847 or 839? Answer: 847. "
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    per = len(tok(unit)["input_ids"])
    body = unit * max(1, (tokens - 12) // per)
    pair = {
        "pair_id": "long",
        "clean": "Which is larger: 847 or 839? " + body + "Answer:",
        "corrupted": "Which is larger: 347 or 839? " + body + "Answer:",
        "clean_answer": " 847",
        "corrupted_answer": " 839",
    }
    return path, pair


def plain_forward_seconds(engine, ids, device: str, repeats: int = 3) -> float:
    """The fastest of ``repeats`` plain forward passes of the pair (no hooks, no grad)."""
    import torch

    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            engine(ids, attention_mask=torch.ones_like(ids))
            _sync(device)
            best = min(best, time.perf_counter() - t0)
    return best


def time_attribution(engine, pairs, device: str, repeats: int = 1, **kw):
    """Attribution of the pair: (result, fastest of ``repeats`` runs in seconds, peak, cells).

    The fastest repeat, like the plain forward pass's, so that the ratio of the two is not the
    ratio of two different moments of a shared machine's load."""
    import numpy as np

    from layerscope.interventions import attribution as A

    seconds, peak = float("inf"), 0
    for _ in range(repeats):
        with PeakMemory(device) as mem:
            _sync(device)
            t0 = time.perf_counter()
            res = A.attribute(engine, pairs, components=COMPONENTS, heads=True, **kw)
            _sync(device)
            seconds = min(seconds, time.perf_counter() - t0)
        peak = max(peak, mem.peak)
    n_cells = sum(int(np.isfinite(v).sum()) for v in res.scores.values())
    return res, seconds, peak, n_cells


def time_exact_subset(bridge, pairs, table, n_cells: int, batch_size: int, device: str, seed: int):
    """Exact sweep of a random subset of the non-identical cells: (cells with exact, seconds,
    peak, cells the full sweep runs, rows run)."""
    from layerscope.interventions import patching as P
    from layerscope.interventions import screen as S

    ok = table[~table["component"].isin(["q", "k"])]
    first = int(ok.loc[ok["atp"].abs() > 0, "position"].min())
    ok = ok[ok["position"] >= first]  # earlier cells are identical: the sweep skips them
    pick = ok.sample(n=min(n_cells, len(ok)), random_state=seed)
    only = {
        (int(r.n_tokens), str(r.component), int(r.layer), int(r.position), int(r.head))
        for r in pick.itertuples()
    }
    with PeakMemory(device) as mem:
        _sync(device)
        t0 = time.perf_counter()
        ex = P.patch_sweep(
            bridge,
            pairs,
            components=COMPONENTS,
            heads=True,
            head_positions="positions",
            batch_size=batch_size,
            only=only,
        )
        _sync(device)
        seconds = time.perf_counter() - t0
    done = S.with_exact(pick.assign(sample="random"), ex.df)
    return done, seconds, mem.peak, len(ok), int(ex.info["n_patched_runs"])


def spearman_by_component(done) -> dict[str, float]:
    from scipy.stats import spearmanr

    out = {}
    for c, g in done[done["verified"]].groupby("component"):
        if len(g) >= 3:
            out[c] = float(spearmanr(g["atp"], g["exact"]).statistic)
    return out


def run_shape(name: str, shape: dict, args, root: Path) -> dict:
    import pandas as pd
    import torch

    from layerscope.engine.loading import load_engine
    from layerscope.interventions import screen as S

    path, pair = build(shape, args.tokens, root)
    pairs = pd.DataFrame([pair])
    native, _ = load_engine(str(path), engine="native", device=args.device)
    bridge, _ = load_engine(str(path), engine="bridge", device=args.device)
    ids = torch.tensor(
        [native.tokenizer(pair["corrupted"])["input_ids"]], device=native.model.device
    )
    t_fwd = plain_forward_seconds(native, ids, args.device, max(3, args.repeats))
    time_attribution(native, pairs, args.device, qk_fix=False)  # warm-up
    r = args.repeats
    res, t_atp, mem_atp, n_atp = time_attribution(native, pairs, args.device, r, qk_fix=False)
    res_qk, t_qk, mem_qk, n_qk = time_attribution(native, pairs, args.device, r, qk_fix=True)
    row = {
        "model": name,
        "shape": shape,
        "n_tokens": int(res.pairs["n_tokens"].iloc[0]),
        "n_cells": n_atp,
        "n_cells_with_qk": n_qk,
        "plain_forward_s": t_fwd,
        "attribution_s": t_atp,
        "attribution_qk_s": t_qk,
        "attribution_fwd_equiv": t_atp / t_fwd,
        "attribution_qk_fwd_equiv": t_qk / t_fwd,
        "attribution_peak_mib": mem_atp / 2**20,
        "attribution_qk_peak_mib": mem_qk / 2**20,
    }
    if name in WIDE:  # exact and GradDrop on CPU at this width would take hours
        return row
    _, t_gd, mem_gd, _ = time_attribution(native, pairs, args.device, qk_fix=False, grad_drop=True)
    table = S.attribution_table_from_means(res.means(n_boot=0).drop(columns="n_pairs"))
    done, t_sub, mem_ex, n_run, n_rows = time_exact_subset(
        bridge, pairs, table, args.exact_cells, args.batch_size, args.device, args.seed
    )
    t_exact = t_sub / max(1, n_rows) * n_run
    return row | {
        "attribution_graddrop_s": t_gd,
        "attribution_graddrop_fwd_equiv": t_gd / t_fwd,
        "attribution_graddrop_peak_mib": mem_gd / 2**20,
        "exact_measured_cells": n_rows,
        "exact_measured_s": t_sub,
        "exact_peak_mib": mem_ex / 2**20,
        "exact_cells_run_by_full_sweep": n_run,
        "exact_s_extrapolated": t_exact,
        "exact_fwd_equiv_extrapolated": t_exact / t_fwd,
        "speedup_exact_over_attribution": t_exact / t_atp,
        "speedup_exact_over_attribution_qk": t_exact / t_qk,
        "spearman_subset": spearman_by_component(done),
    }


def report(rows: list[dict]) -> str:
    lines = [
        "exact seconds are EXTRAPOLATED from a measured random subset of cells "
        "(seconds per patched cell x cells the full sweep runs)",
        "| model | tokens | cells | fwd s | AtP s (fwd-eq, MiB) | AtP+QK s (fwd-eq, MiB) | "
        "GradDrop s (fwd-eq) | exact measured | exact s extrap. (fwd-eq, MiB) | speedup |",
        "|---|---:|---:|---:|---|---|---|---|---|---:|",
    ]
    for r in rows:
        if "exact_s_extrapolated" not in r:
            lines.append(
                f"| {r['model']} | {r['n_tokens']} | {r['n_cells']} | {r['plain_forward_s']:.3f} | "
                f"{r['attribution_s']:.2f} ({r['attribution_fwd_equiv']:.1f}, "
                f"{r['attribution_peak_mib']:.0f}) | {r['attribution_qk_s']:.2f} "
                f"({r['attribution_qk_fwd_equiv']:.1f}, {r['attribution_qk_peak_mib']:.0f}) | "
                "not run | not run | not run | |"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['n_tokens']} | {r['n_cells']} | {r['plain_forward_s']:.3f} | "
            f"{r['attribution_s']:.2f} ({r['attribution_fwd_equiv']:.1f}, "
            f"{r['attribution_peak_mib']:.0f}) | {r['attribution_qk_s']:.2f} "
            f"({r['attribution_qk_fwd_equiv']:.1f}, {r['attribution_qk_peak_mib']:.0f}) | "
            f"{r['attribution_graddrop_s']:.2f} ({r['attribution_graddrop_fwd_equiv']:.1f}) | "
            f"{r['exact_measured_cells']} cells in {r['exact_measured_s']:.1f} s | "
            f"{r['exact_s_extrapolated']:.0f} ({r['exact_fwd_equiv_extrapolated']:.0f}, "
            f"{r['exact_peak_mib']:.0f}) | {r['speedup_exact_over_attribution']:.0f}x |"
        )
    for r in rows:
        if "spearman_subset" not in r:
            continue
        sp = ", ".join(f"{c} {v:.2f}" for c, v in sorted(r["spearman_subset"].items()))
        lines.append(f"{r['model']}: Spearman atp vs exact on the measured subset: {sp}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--tokens", type=int, default=512, help="tokens of the pair (>= 500)")
    ap.add_argument("--exact-cells", type=int, default=256, help="cells timed exactly")
    ap.add_argument("--batch-size", type=int, default=64, help="rows per exact forward pass")
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES | WIDE))
    ap.add_argument(
        "--wide", action="store_true", help="also the 1.5B-width 28-layer shape (attribution only)"
    )
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--repeats", type=int, default=3, help="attribution runs; the fastest counts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    shapes = (QUICK if args.quick else SHAPES) | WIDE
    if args.wide and "qwen2-28L-wide" not in args.models:
        args.models.append("qwen2-28L-wide")
    if args.quick:
        args.tokens, args.exact_cells, args.batch_size = min(args.tokens, 96), 64, 32
    root = Path(tempfile.gettempdir()) / "layerscope-bench" / "attribution"
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        rows.append(run_shape(name, shapes[name], args, root))
        print(json.dumps(rows[-1], default=str), file=sys.stderr, flush=True)  # kept if cut short
    print(report(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
