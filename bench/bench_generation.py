"""Benchmark: generation patching, batched (many (pair, cell) variants per forward pass, KV cache)
vs one variant at a time (batch size 1, the seed's loop), on the bundled demo model.

Both arms run :func:`layerscope.interventions.generation.generation_sweep` on the same pairs and
cells and must
produce identical tables (checked). Arms are interleaved (A B A B ...) so that load from other
processes hits both alike; the reported ratio is median(one at a time) / median(batched).
Model loading is excluded; one warm-up generation runs first.

    python bench/bench_generation.py    # 8 pairs, 4 components x 6 layers x (diff, gen1), 3 repeats
    python bench/bench_generation.py --pairs 4 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import pandas as pd
    import torch

    from layerscope.engine.loading import load_model
    from layerscope.interventions import generation as G
    from layerscope.interventions.patching import load_pairs

    torch.set_num_threads(args.threads)
    bridge, _ = load_model(str(ROOT / "demo/model"), device="cpu")
    pairs = load_pairs(ROOT / "demo/data/patching_pairs.csv").iloc[: args.pairs]
    stepper = G.BridgeStepper(bridge)

    def run(batch_size: int):
        t = time.perf_counter()
        df = G.generation_sweep(
            stepper,
            bridge.tokenizer,
            pairs,
            components=G.COMPONENTS,
            layers=range(6),
            positions=["diff", "gen1"],
            ranges=[],
            max_new_tokens=args.max_new_tokens,
            batch_size=batch_size,
        )
        return time.perf_counter() - t, df

    run(args.batch_size)  # warm-up
    times: dict[str, list[float]] = {"batched": [], "one_at_a_time": []}
    tables = {}
    for _ in range(args.repeats):
        for name, bs in (("batched", args.batch_size), ("one_at_a_time", 1)):
            sec, df = run(bs)
            times[name].append(sec)
            tables[name] = df
    pd.testing.assert_frame_equal(tables["batched"], tables["one_at_a_time"])
    n = int(tables["batched"].attrs["n_patched_generations"]) + 2 * len(pairs)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(
            f"{k:14s} runs {[f'{x:.2f}' for x in v]} s, median {med[k]:.2f} s, "
            f"{n * args.max_new_tokens / med[k]:.0f} generated tokens/s ({n} generations)"
        )
    ratio = med["one_at_a_time"] / med["batched"]
    print(f"speed-up batched vs one at a time: {ratio:.1f}x (identical tables)")


if __name__ == "__main__":
    main()
