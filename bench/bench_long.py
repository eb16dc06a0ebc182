"""Benchmark: caching on chain-of-thought-length prompts. layerscope's store vs plain transformers
(SDPA) vs the seed one-prompt-at-a-time loop, side by side in one run.

Cases (6-layer, d_model 256 models with random weights, a byte-level BPE vocabulary of 2,000
tokens):

  short   Llama,  256 prompts x 10-40 tokens,     batch 32
  mid     GPT-2,   16 prompts x 400-500 tokens,   batch 8   (and Llama)
  long    GPT-2,    8 prompts x 1000-1200 tokens, batch 4   (and Llama)

Methods, each (case, method) in its own subprocess so that its peak RSS is its own:

  store  ``layerscope.engine.store.cache_store`` with the workflow's default engine (``auto``:
  the
         native engine), resid_post, mean and last, every layer; self-check off for the timed runs,
         then one run with the default self-check (4 prompts) reported apart.
  plain  ``AutoModel`` (base model, SDPA), the same length-sorted right-padded batches with an
  attention
         mask, ``output_hidden_states``, mean and last pooled by hand for every layer.
  bridge (opt-in) the same ``cache_store`` with ``engine: bridge`` (TransformerBridge, eager
  attention).
  seed   ``TransformerBridge.run_with_cache(text)`` one prompt at a time, all hooks, mean of every
         layer's resid_post (what the seed notebooks did).

``--gpu`` instead runs a DeepSeek-R1-Distill-Qwen-1.5B-shaped Qwen2 (28 layers, d_model 1536, 12
heads,
2 KV heads, MLP 8960, vocabulary 151,936; random weights, bfloat16, CUDA) on short and long prompts,
store vs plain, peak GPU memory from ``torch.cuda.max_memory_allocated``.

Model loading is excluded, every method is warmed up first, methods run in interleaved rounds
(``--repeats``) and the fastest round is reported.
``python bench/bench_long.py`` (CPU, ~5-10 min on 2 cores), ``--quick`` for a smoke run,
``python bench/bench_long.py --gpu`` on a CUDA machine.
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

#: case -> (arch, n_prompts, min tokens, max tokens, batch_size)
CASES = {
    "short-llama": ("llama", 256, 10, 40, 32),
    "mid-gpt2": ("gpt2", 16, 400, 500, 8),
    "mid-llama": ("llama", 16, 400, 500, 8),
    "long-gpt2": ("gpt2", 8, 1000, 1200, 4),
    "long-llama": ("llama", 8, 1000, 1200, 4),
}
GPU_CASES = {
    "gpu-short": ("qwen2-1.5b", 256, 10, 40, 32),
    "gpu-long": ("qwen2-1.5b", 16, 1000, 1200, 4),
}
SYLL = [
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
]


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(SYLL) for _ in range(rng.randint(1, 3))) for _ in range(n))


def build_model(root: Path, arch: str) -> Path:
    out = root / arch
    if (out / "config.json").exists():
        return out
    import torch
    import transformers

    from devkit.vocab import build_bpe_tokenizer

    rng = random.Random(0)
    tok = build_bpe_tokenizer([_words(rng, 40) for _ in range(5000)], vocab_size=2000)
    special = tok.convert_tokens_to_ids(tok.bos_token)
    common = dict(bos_token_id=special, eos_token_id=special, tie_word_embeddings=False)
    torch.manual_seed(0)
    if arch == "gpt2":
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=len(tok), n_embd=256, n_layer=6, n_head=8, n_positions=2048, **common
            )
        )
    elif arch == "llama":
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=len(tok),
                hidden_size=256,
                intermediate_size=1024,
                num_hidden_layers=6,
                num_attention_heads=8,
                num_key_value_heads=4,
                max_position_embeddings=2048,
                **common,
            )
        )
    else:  # DeepSeek-R1-Distill-Qwen-1.5B shape
        model = transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(
                vocab_size=151936,
                hidden_size=1536,
                intermediate_size=8960,
                num_hidden_layers=28,
                num_attention_heads=12,
                num_key_value_heads=2,
                max_position_embeddings=4096,
                **common,
            )
        )
        model = model.to(torch.bfloat16)
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_prompts(model_dir: Path, n: int, lo: int, hi: int, seed: int = 1) -> list[str]:
    """``n`` texts of ``lo`` to ``hi`` tokens (BOS included)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        target = rng.randint(lo, hi) - 1
        ids = tok(_words(rng, target), add_special_tokens=False)["input_ids"][:target]
        texts.append(tok.decode(ids))
    return texts


# ----------------------------------------------------------------------------------------------
# workers


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(round(time.perf_counter() - t0, 3))
    return out


def worker(
    method: str, case: str, model_dir: Path, out_dir: Path, repeats: int, device: str
) -> dict:
    import numpy as np
    import torch

    arch, n, lo, hi, batch = {**CASES, **GPU_CASES}[case]
    dtype = "bfloat16" if device == "cuda" else "float32"
    texts = make_prompts(model_dir, n, lo, hi)
    res: dict = {"case": case, "method": method, "n_prompts": n, "threads": torch.get_num_threads()}
    if method in ("store", "bridge"):
        from layerscope.engine.loading import load_engine
        from layerscope.engine.store import cache_store

        engine = "bridge" if method == "bridge" else "auto"
        model, info = load_engine(str(model_dir), engine=engine, device=device, dtype=dtype)
        res["engine"] = info["engine"]
        pids = [f"p{i}" for i in range(n)]

        def run(check=0):
            cache_store(
                model,
                pids,
                texts,
                ["x"] * n,
                out_dir / f"{case}_{method}.h5",
                components=["resid_post"],
                poolings=["mean", "last"],
                batch_size=batch,
                model_info=info,
                log=None,
                self_check=check,
            )

        run()  # warm-up
        res["all_seconds"] = _time(run, repeats)
        res["seconds_with_self_check"] = _time(lambda: run(4), 1)[0]
        import h5py

        with h5py.File(out_dir / f"{case}_{method}.h5") as f:
            out = f["resid_post/mean"][:-1]
    elif method == "plain":
        from transformers import AutoModel, AutoTokenizer

        from layerscope.engine.loading import torch_dtype
        from layerscope.engine.tokens import make_batches, tokenize_prompts

        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModel.from_pretrained(
            model_dir, attn_implementation="sdpa", dtype=torch_dtype(dtype)
        )
        model = model.to(device).eval()
        ids = tokenize_prompts(tok, texts, prepend_bos=True)
        lengths = [len(x) for x in ids]
        n_layers = model.config.num_hidden_layers
        out = np.zeros((n_layers, n, model.config.hidden_size), dtype=np.float32)

        def run():
            with torch.inference_mode():
                for b in make_batches(lengths, batch):
                    T = max(lengths[i] for i in b)
                    x = torch.zeros((len(b), T), dtype=torch.long)
                    m = torch.zeros((len(b), T), dtype=torch.long)
                    for r, i in enumerate(b):
                        x[r, : lengths[i]] = torch.tensor(ids[i])
                        m[r, : lengths[i]] = 1
                    x, m = x.to(device), m.to(device)
                    hs = model(
                        input_ids=x, attention_mask=m, output_hidden_states=True
                    ).hidden_states
                    w = m.clone()
                    w[:, 0] = 0
                    w = w.unsqueeze(-1).float()
                    last = torch.tensor([lengths[i] - 1 for i in b], device=device)
                    for L in range(n_layers):
                        h = hs[L + 1].float()
                        out[L, b] = ((h * w).sum(1) / w.sum(1)).cpu().numpy()
                        h[torch.arange(len(b), device=device), last].cpu()

        run()
        res["all_seconds"] = _time(run, repeats)
        out = out[:-1]  # the last hidden state has the final norm applied
    elif method == "seed":
        from layerscope.engine.loading import load_model

        bridge, _ = load_model(str(model_dir), device=device, dtype=dtype)
        bridge.run_with_cache(texts[0])
        n_layers = bridge.cfg.n_layers
        out = np.zeros((n_layers, n, bridge.cfg.d_model), dtype=np.float32)

        def run():
            for i, text in enumerate(texts):
                _, cache = bridge.run_with_cache(text)
                for L in range(n_layers):
                    out[L, i] = (
                        cache[f"blocks.{L}.hook_resid_post"][0, 1:].float().mean(0).cpu().numpy()
                    )
                del cache

        res["all_seconds"] = _time(run, 1)
        out = out[:-1]
    else:
        raise SystemExit(f"unknown method {method}")
    np.save(out_dir / f"{case}_{method}.npy", out)
    res["seconds"] = min(res["all_seconds"])
    res["peak_rss_mb"] = _peak_mb()
    if device == "cuda":
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def run_worker(method, case, model_dir, out_dir, repeats, device) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--case",
        case,
        "--model-dir",
        str(model_dir),
        "--out-dir",
        str(out_dir),
        "--repeats",
        str(repeats),
        "--device",
        device,
    ]
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(
            f"worker {method} {case} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: list[dict], cases: list[str], gpu: bool) -> None:

    by = {(r["case"], r["method"]): r for r in results}
    mem = "peak_gpu_mb" if gpu else "peak_rss_mb"
    print(
        "\n| case | method | wall s (fastest) | all repeats | "
        f"{'peak GPU MiB' if gpu else 'peak RSS MiB'} |"
    )
    print("|---|---|---:|---|---:|")
    for r in results:
        extra = (
            f" (with self-check {r['seconds_with_self_check']:.2f})"
            if "seconds_with_self_check" in r
            else ""
        )
        print(
            f"| {r['case']} | {r['method']} | {r['seconds']:.2f}{extra} | "
            f"{r['all_seconds']} | {r[mem]:.0f} |"
        )
    print()
    for c in cases:
        s, p, seed = by.get((c, "store")), by.get((c, "plain")), by.get((c, "seed"))
        line = [f"{c}:"]
        if s and p:
            line.append(
                f"store/plain time {s['seconds'] / p['seconds']:.2f} (target <= 1.15), "
                f"memory {s[mem] / p[mem]:.2f} (target <= 1.3)"
            )
        if s and seed:
            line.append(f"seed/store {seed['seconds'] / s['seconds']:.1f}")
        if s and by.get((c, "bridge")):
            line.append(f"bridge/store {by[(c, 'bridge')]['seconds'] / s['seconds']:.2f}")
        if s and p and "diff" in s:
            line.append(f"store vs plain max |diff| {s['diff']:.1e}")
        print("  ".join(line))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--cases", nargs="+", default=None, help=f"some of {list(CASES)} (default: all)"
    )
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["store", "plain", "seed"],
        choices=["store", "plain", "seed", "bridge"],
        help="bridge = cache_store with engine: bridge (the pre-native path), for comparison",
    )
    ap.add_argument(
        "--gpu", action="store_true", help="the 1.5B Qwen2-shaped model in bfloat16 on CUDA"
    )
    ap.add_argument(
        "--quick", action="store_true", help="one repeat, long-gpt2 and short-llama only"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--model-root", type=Path, default=Path(tempfile.gettempdir()) / "layerscope-bench-long"
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(
            json.dumps(
                worker(
                    args.worker, args.case, args.model_dir, args.out_dir, args.repeats, args.device
                )
            )
        )
        return
    import numpy as np

    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs CUDA, and this machine has none")
        table, device, methods = GPU_CASES, "cuda", [m for m in args.methods if m != "seed"]
    else:
        table, device, methods = CASES, "cpu", args.methods
    cases = args.cases or (["short-llama", "long-gpt2"] if args.quick else list(table))
    repeats = 1 if args.quick else args.repeats
    print(
        f"cpu cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, device {device}",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="layerscope-bench-long-") as tmp:
        for case in cases:
            model_dir = build_model(args.model_root, table[case][0])
            # Interleaved rounds (store, plain, store, plain, ...), one timed pass per process, so
            # that load from other jobs on the machine hits every method alike; fastest round kept.
            runs: dict[str, list[dict]] = {m: [] for m in methods}
            for rnd in range(repeats):
                for method in methods:
                    if method == "seed" and rnd:
                        continue  # minutes per pass, and never close
                    runs[method].append(run_worker(method, case, model_dir, Path(tmp), 1, device))
            for method in methods:
                r = min(runs[method], key=lambda x: x["seconds"])
                r["all_seconds"] = [x["seconds"] for x in runs[method]]
                r["peak_rss_mb"] = max(x["peak_rss_mb"] for x in runs[method])
                results.append(r)
                print(
                    f"  {case:12s} {method:6s} {r['seconds']:7.2f} s  rounds {r['all_seconds']}",
                    flush=True,
                )
            if {"store", "plain"} <= set(methods):
                a, b = (np.load(Path(tmp) / f"{case}_{m}.npy") for m in ("store", "plain"))
                next(r for r in results if r["case"] == case and r["method"] == "store")["diff"] = (
                    float(np.abs(a - b).max())
                )
    report(results, cases, args.gpu)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
