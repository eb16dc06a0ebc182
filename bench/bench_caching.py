"""Benchmark: pooled-activation caching, seed-style loop vs layerscope vs plain transformers.

Builds a GPT-2-small-shaped model (12 layers, d_model 768, 12 heads, random weights, a byte-level
BPE vocabulary trained on seeded random text) and times, each in its own subprocess so that peak
memory (RSS high-water mark) is separable:

  (a) seed   - ``bridge.run_with_cache(prompt)`` one prompt at a time, all hooks, mean of
               ``blocks.L.hook_resid_post`` over all tokens for L in 3, 6, 9, 11;
  (b) store  - ``layerscope.engine.store.cache_store`` (resid_post, mean, every layer: what
  the
               workflow rule runs), then ``extract_layer`` for layers 3, 6, 9, 11 (timed apart);
  (c) plain  - ``transformers.GPT2Model`` (no LM head), length-sorted batches, right padding with
               an attention mask, ``output_hidden_states``, masked mean by hand (BOS left out, as in
               b).

Model loading is excluded; every method is warmed up (one forward pass) before timing.
Run ``python bench/bench_caching.py`` (add ``--quick`` for a fast smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# devkit/ (tiny test models, the demo model and data) sits at the repository root, outside the
# package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYERS = [3, 6, 9, 11]
BATCH = 32


# ----------------------------------------------------------------------------------------------
# model and prompts


def _words(rng: random.Random, n: int) -> list[str]:
    syll = [
        "ka",
        "lo",
        "mi",
        "ten",
        "ra",
        "sun",
        "vel",
        "or",
        "pa",
        "qui",
        "ze",
        "bo",
        "an",
        "ist",
        "ul",
        "dra",
        "fe",
        "gon",
        "hy",
        "jas",
        "wer",
        "tho",
        "cla",
        "pre",
        "nox",
    ]
    out = []
    for _ in range(n):
        w = "".join(rng.choice(syll) for _ in range(rng.randint(1, 4)))
        if rng.random() < 0.1:
            w = str(rng.randint(0, 999))
        out.append(w.capitalize() if rng.random() < 0.15 else w)
    return out


def build_model(model_dir: Path, vocab_size: int, seed: int = 0) -> Path:
    if (model_dir / "config.json").exists():
        return model_dir
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from devkit.vocab import build_bpe_tokenizer

    rng = random.Random(seed)
    corpus = [" ".join(_words(rng, 40)) for _ in range(20000)]
    tok = build_bpe_tokenizer(corpus, vocab_size=vocab_size)
    bos = tok.convert_tokens_to_ids(tok.bos_token)
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_embd=768,
        n_layer=12,
        n_head=12,
        n_positions=1024,
        bos_token_id=bos,
        eos_token_id=bos,
    )
    model = GPT2LMHeadModel(cfg).eval()
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


def make_prompts(model_dir: Path, n: int, seed: int = 1) -> list[str]:
    """``n`` texts of 8 to 40 tokens (BOS included), from a seeded generator."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        target = rng.randint(7, 39)  # + BOS = 8..40
        ids = tok(" ".join(_words(rng, target)), add_special_tokens=False)["input_ids"][:target]
        texts.append(tok.decode(ids).strip() or "x")
    return texts


# ----------------------------------------------------------------------------------------------
# workers (one measurement per process)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(
    method: str, model_dir: Path, n: int, out_dir: Path, threads: int | None, repeats: int = 1
) -> dict:
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    texts = make_prompts(model_dir, n)
    res: dict = {"method": method, "n_prompts": n, "threads": torch.get_num_threads()}

    if method in ("seed", "store"):
        from layerscope.engine.loading import load_engine, load_model
        from layerscope.engine.store import cache_store, extract_layer
        from layerscope.engine.tokens import tokenize_prompts

        # the seed loop is TransformerLens's run_with_cache; the store takes the workflow's default
        # engine
        if method == "seed":
            bridge, info = load_model(str(model_dir), device="cpu")
        else:
            bridge, info = load_engine(str(model_dir), device="cpu")
            res["engine"] = info["engine"]
        ids = tokenize_prompts(bridge.tokenizer, texts, prepend_bos=True)
        res["tokens"] = sum(len(x) for x in ids)
        bridge(torch.tensor([ids[0]]), return_type=None)  # warm-up (lazy weights, allocator)
        res["rss_before_mb"] = _rss_mb()
        if method == "seed":
            names = [f"blocks.{L}.hook_resid_post" for L in LAYERS]
            out = np.zeros((len(LAYERS), n, 768), dtype=np.float32)
            for _ in range(repeats):
                c0, t0 = time.process_time(), time.perf_counter()
                n_fed = 0
                for i, text in enumerate(texts):
                    _, cache = bridge.run_with_cache(text)
                    n_fed += cache[names[0]].shape[1]
                    for k, name in enumerate(names):
                        out[k, i] = cache[name][0].mean(0).float().numpy()
                    del cache
                _record(res, time.perf_counter() - t0, time.process_time() - c0)
            res["tokens_fed"] = n_fed
        else:
            store = out_dir / f"store_{n}.h5"
            pids = [f"p{i:05d}" for i in range(n)]
            for _ in range(repeats):
                c0, t0 = time.process_time(), time.perf_counter()
                cache_store(
                    bridge,
                    pids,
                    texts,
                    ["x"] * n,
                    store,
                    components=["resid_post"],
                    poolings=["mean"],
                    batch_size=BATCH,
                    model_info=info,
                    log=lambda m: None,
                    self_check=0,
                )
                _record(res, time.perf_counter() - t0, time.process_time() - c0)
            t1 = time.perf_counter()
            for L in LAYERS:
                extract_layer(store, L, out_dir / f"layer_{L}.h5")
            res["extract_seconds"] = time.perf_counter() - t1
            import h5py

            with h5py.File(store) as f:
                out = f["resid_post/mean"][LAYERS]
    elif method == "plain":
        from transformers import AutoTokenizer, GPT2Model

        from layerscope.engine.tokens import tokenize_prompts

        tok = AutoTokenizer.from_pretrained(model_dir)
        model = GPT2Model.from_pretrained(model_dir).eval()
        res["attn_implementation"] = model.config._attn_implementation
        ids = tokenize_prompts(tok, texts, prepend_bos=True)
        res["tokens"] = sum(len(x) for x in ids)
        lengths = [len(x) for x in ids]
        with torch.inference_mode():
            model(torch.tensor([ids[0]]))  # warm-up
            res["rss_before_mb"] = _rss_mb()
            out = np.zeros((len(LAYERS), n, 768), dtype=np.float32)
            for _ in range(repeats):
                c0, t0 = time.process_time(), time.perf_counter()
                _plain_pass(model, ids, lengths, out)
                _record(res, time.perf_counter() - t0, time.process_time() - c0)
    else:
        raise SystemExit(f"unknown method {method}")
    np.save(out_dir / f"{method}_{n}.npy", out)
    res["tokens_per_s"] = res["tokens"] / res["seconds"]
    res["peak_rss_mb"] = _peak_mb()
    return res


def _record(res: dict, wall: float, cpu: float) -> None:
    """Keep every repeat; report the fastest (least disturbed by other load on the machine)."""
    res.setdefault("all_seconds", []).append(round(wall, 3))
    if "seconds" not in res or wall < res["seconds"]:
        res["seconds"], res["cpu_seconds"] = wall, cpu


def _plain_pass(model, ids, lengths, out) -> None:
    import torch

    from layerscope.engine.tokens import make_batches

    with torch.inference_mode():
        for batch in make_batches(lengths, BATCH):
            T = max(lengths[i] for i in batch)
            x = torch.zeros((len(batch), T), dtype=torch.long)
            m = torch.zeros((len(batch), T), dtype=torch.long)
            for r, i in enumerate(batch):
                x[r, : lengths[i]] = torch.tensor(ids[i])
                m[r, : lengths[i]] = 1
            hs = model(input_ids=x, attention_mask=m, output_hidden_states=True).hidden_states
            w = m.clone()
            w[:, 0] = 0  # BOS left out, as cache_store does by default
            w = w.unsqueeze(-1).float()
            # hidden_states[L + 1] is block L's output, except hidden_states[12], which has ln_f
            # applied ((b) stores the pre-norm output of block 11): the check compares 3, 6, 9 only
            for k, L in enumerate(LAYERS):
                out[k, batch] = ((hs[L + 1] * w).sum(1) / w.sum(1)).numpy()
            # every layer is pooled by (b) too: pool the rest for the same amount of work
            for L in range(12):
                if L not in LAYERS:
                    ((hs[L + 1] * w).sum(1) / w.sum(1)).numpy()


def run_worker(
    method: str, model_dir: Path, n: int, out_dir: Path, threads: int | None, repeats: int
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--model-dir",
        str(model_dir),
        "--n-prompts",
        str(n),
        "--out-dir",
        str(out_dir),
        "--repeats",
        str(repeats),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"worker {method} n={n} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--n-prompts",
        type=int,
        nargs="+",
        default=None,
        help="prompt counts to run (default: 256 1024; --quick: 64)",
    )
    ap.add_argument("--quick", action="store_true", help="64 prompts only, for a smoke run")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="where the benchmark model is built/reused (default: a folder under the temp dir)",
    )
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["seed", "store", "plain"],
        choices=["seed", "store", "plain"],
    )
    ap.add_argument(
        "--seed-max-prompts",
        type=int,
        default=None,
        help="skip the slow seed loop above this many prompts (default: run it everywhere)",
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads per worker (default: torch's)"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per measurement, fastest reported "
        "(default: 3 for store/plain, 1 for seed; "
        "--quick: 1)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        n = args.n_prompts[0]
        print(
            json.dumps(
                worker(args.worker, args.model_dir, n, args.out_dir, args.threads, args.repeats)
            )
        )
        return

    sizes = args.n_prompts or ([64] if args.quick else [256, 1024])
    model_dir = (
        args.model_dir
        or Path(tempfile.gettempdir()) / f"layerscope-bench/gpt2-small-v{args.vocab_size}"
    )
    t = time.perf_counter()
    build_model(model_dir, args.vocab_size)
    print(
        f"model: {model_dir} (ready in {time.perf_counter() - t:.1f} s); "
        f"cpu cores: {os.cpu_count()}"
    )

    import numpy as np

    results = []
    with tempfile.TemporaryDirectory(prefix="layerscope-bench-") as tmp:
        out_dir = Path(tmp)
        for n in sizes:
            for method in args.methods:
                if method == "seed" and args.seed_max_prompts and n > args.seed_max_prompts:
                    continue
                reps = args.repeats or (1 if args.quick or method == "seed" else 3)
                r = run_worker(method, model_dir, n, out_dir, args.threads, reps)
                results.append(r)
                extra = (
                    f", extract 4 layers {r['extract_seconds']:.2f} s"
                    if "extract_seconds" in r
                    else ""
                )
                print(
                    f"  n={n:5d} {method:5s}: {r['seconds']:7.2f} s wall "
                    f"({r['cpu_seconds']:.1f} s cpu), "
                    f"{r['tokens_per_s']:7.0f} tokens/s, "
                    f"peak RSS {r['peak_rss_mb']:.0f} MiB{extra}; "
                    f"all repeats {r['all_seconds']}",
                    flush=True,
                )
            if {"store", "plain"} <= set(args.methods):
                b = np.load(out_dir / f"store_{n}.npy")
                c = np.load(out_dir / f"plain_{n}.npy")
                # layer 11 of (c) is after GPT-2's final LayerNorm; compare the other three exactly
                diff = float(np.abs(b[:3] - c[:3]).max())
                results.append(
                    {"method": "check", "n_prompts": n, "max_abs_diff_store_vs_plain_L3_6_9": diff}
                )
                print(f"  n={n:5d} store vs plain, layers 3/6/9: max |diff| = {diff:.2e}")

    by = {(r["n_prompts"], r["method"]): r for r in results}
    print("\n| prompts | method | wall s | tokens/s | peak RSS MiB |")
    print("|---:|---|---:|---:|---:|")
    for r in results:
        if r["method"] == "check":
            continue
        print(
            f"| {r['n_prompts']} | {r['method']} | {r['seconds']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    print()
    for n in sizes:
        a, b, c = by.get((n, "seed")), by.get((n, "store")), by.get((n, "plain"))
        parts = [f"n={n}:"]
        if a and b:
            parts.append(f"a/b = {a['seconds'] / b['seconds']:.2f} (target >= 4)")
        if b and c:
            parts.append(f"b/c = {b['seconds'] / c['seconds']:.2f} (target <= 1.15)")
        print("  ".join(parts))
    for m in args.methods:
        lo, hi = by.get((min(sizes), m)), by.get((max(sizes), m))
        if lo and hi and lo is not hi:
            print(
                f"peak RSS {m}: {hi['peak_rss_mb']:.0f} / {lo['peak_rss_mb']:.0f} MiB = "
                f"{hi['peak_rss_mb'] / lo['peak_rss_mb']:.2f}x "
                f"({max(sizes)} vs {min(sizes)} prompts; target <= 1.2)"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
