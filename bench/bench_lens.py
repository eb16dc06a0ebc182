"""Benchmark: every lens and probe readout along 1,000-2,000-token chains of thought in one forward
pass, against a plain forward pass, side by side in one run.

Model: a 28-layer Qwen2 (the layout of DeepSeek-R1-Distill-Qwen-1.5B) with random weights. On
``--device cuda`` with ``--full`` it has that model's shape (d_model 1536, 12 heads, 2 KV heads, MLP
8960, vocabulary 151,936, bfloat16); otherwise a narrow one (d_model 128, 4 heads, MLP 512) with two
vocabularies (8,192 and 32,768) so that memory can be compared across vocabulary sizes.

Methods, per (vocabulary, prompt length), each in its own process on CPU (peak RSS is its own) or
with ``torch.cuda.reset_peak_memory_stats`` on CUDA:

  plain     the base model's forward pass (no LM head), batch of ``--batch`` prompts
  lm        the full causal-LM forward pass (logits at every position: vocabulary x positions)
  readouts  ``layerscope.analysis.trajectories.run_readouts``: logit lens and an (identity) tuned
            lens at every layer and position (answer log-prob, rank, top-5, KL to the final
            layer) and two probes at every position, from one forward pass per batch

Reported: seconds (fastest of ``--repeats``), the ratio readouts / plain, peak memory, and what
keeping the logits of every layer and position would take (layers x positions x vocabulary x 4
bytes). On CPU the peak RSS is measured in a second run of each method with
``MALLOC_MMAP_THRESHOLD_=65536`` (large blocks are returned to the system when freed, so RSS is the
peak of live memory rather than of glibc's free lists; timings come from the first run, without
it). ``python bench/bench_lens.py`` (CPU, a few minutes on 2 cores), ``--quick`` for a smoke run,
``python bench/bench_lens.py --device cuda --full`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_LAYERS = 28


def build(vocab: int, full: bool, device: str):
    """The random-weight 28-layer Qwen2 as layerscope's native engine (no tokenizer needed)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from layerscope.engine.native import NativeEngine

    if full:
        kw = dict(hidden_size=1536, num_attention_heads=12, num_key_value_heads=2)
        kw.update(intermediate_size=8960, vocab_size=151936)
        dtype = torch.bfloat16
    else:
        kw = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
        kw.update(intermediate_size=512, vocab_size=vocab)
        dtype = torch.float32
    cfg = Qwen2Config(num_hidden_layers=N_LAYERS, max_position_embeddings=4096, **kw)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    return NativeEngine(model, tokenizer=None, attn_implementation="sdpa"), cfg


def prompts(n: int, length: int, vocab: int):
    import numpy as np

    from layerscope.analysis.trajectories import Prompt

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        T = length + 50 * i
        ids = rng.integers(0, vocab, size=T)
        out.append(Prompt(ids, T - 8, int(ids[T - 8])))
    return out


def run_method(method: str, vocab: int, length: int, args) -> dict:
    import numpy as np
    import torch

    from layerscope.analysis import trajectories as TR

    torch.set_num_threads(args.threads)
    eng, cfg = build(vocab, args.full, args.device)
    ps = prompts(args.batch, length, cfg.vocab_size)
    d = cfg.hidden_size
    rng = np.random.default_rng(1)
    probes = [
        TR.ProbeView(f"p{L}", "x", L, "resid_post", "mean", rng.standard_normal(d), 0.0, "a")
        for L in (7, 20)
    ]
    ident = {"tuned": lambda L, h: h.float()}
    ids = torch.zeros((len(ps), max(len(p.ids) for p in ps)), dtype=torch.long)
    for r, p in enumerate(ps):
        ids[r, : len(p.ids)] = torch.as_tensor(p.ids)
    ids, mask = ids.to(args.device), (ids >= 0).long().to(args.device)

    def once():
        with torch.no_grad():
            if method == "plain":
                eng(ids, attention_mask=mask, return_type=None)
            elif method == "lm":
                eng(ids, attention_mask=mask, return_type="logits")
            else:
                TR.run_readouts(
                    eng,
                    ps,
                    n_layers=N_LAYERS,
                    translators=ident,
                    probes=probes,
                    batch_size=len(ps),
                    chunk=args.chunk,
                )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    once()  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(args.repeats):
        t = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = sum(len(p.ids) for p in ps)
    return {"seconds": best, "peak_mb": peak, "tokens": tokens, "vocab": cfg.vocab_size}


def _worker(passed, method, vocab, length, env) -> dict:
    """One method in its own process (its own peak memory)."""
    import os

    cmd = [sys.executable, __file__, *passed, "--worker", method, str(vocab), str(length)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full", action="store_true", help="DeepSeek-R1-Distill-Qwen-1.5B shape")
    ap.add_argument("--quick", action="store_true", help="one length, one vocabulary, 1 repeat")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--vocabs", default=None, help="comma-separated vocabulary sizes (narrow model)"
    )
    ap.add_argument("--lengths", default=None, help="comma-separated prompt lengths in tokens")
    ap.add_argument("--worker", nargs=3, metavar=("METHOD", "VOCAB", "LENGTH"))
    args = ap.parse_args()
    if args.worker:
        m, v, n = args.worker
        print(json.dumps(run_method(m, int(v), int(n), args)))
        return
    if args.quick:
        args.repeats = 1
    vocabs = [151936] if args.full else ([8192] if args.quick else [8192, 32768])
    lengths = [1000] if args.quick else [1000, 2000]
    if args.vocabs and not args.full:
        vocabs = [int(v) for v in args.vocabs.split(",")]
    if args.lengths:
        lengths = [int(n) for n in args.lengths.split(",")]
    passed = [a for a in sys.argv[1:] if a not in ("--quick",)]
    if args.quick:
        passed += ["--repeats", "1"]
    print(
        f"{'vocab':>7} {'tokens':>7} {'method':>9} {'seconds':>8} {'ratio':>6} {'peak MB':>8}"
        f" {'all-logits MB':>13}"
    )
    for v in vocabs:
        for n in lengths:
            res = {}
            for m in ("plain", "lm", "readouts"):
                res[m] = _worker(passed, m, v, n, {})
                if args.device == "cpu":
                    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
                    res[m]["peak_mb"] = _worker(passed + ["--repeats", "1"], m, v, n, env)[
                        "peak_mb"
                    ]
            naive = N_LAYERS * res["plain"]["tokens"] * res["plain"]["vocab"] * 4 / 2**20
            for m, r in res.items():
                ratio = r["seconds"] / res["plain"]["seconds"]
                print(
                    f"{r['vocab']:>7} {r['tokens']:>7} {m:>9} {r['seconds']:>8.2f} {ratio:>6.2f}"
                    f" {r['peak_mb']:>8.0f} {naive:>13.0f}"
                )


if __name__ == "__main__":
    main()
