"""Benchmark: peak memory of sharded caching jobs does not grow with the dataset.

Writes synthetic prompt tables of 5,000 and 20,000 prompts and caches them on a tiny GPT-2
(random weights, 4 layers, d_model 64) the way the workflow does, each job in its own subprocess
so that its peak RSS (``ru_maxrss`` from ``wait4``) is its own:

  * one unsharded ``cache_activations`` job per table (memory of the whole job);
  * ``cache_shard`` jobs of 2,500 prompts each (2 shards for 5,000, 8 for 20,000);
  * the ``gather_activations`` job that joins them;

then checks that the gathered store equals the unsharded one array for array.
Run ``python bench/bench_sharding.py`` (``--quick`` uses 1,000 and 4,000 prompts).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# devkit/ (tiny test models, the demo model and data) sits at the repository root, outside the
# package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PER_SHARD = 2500
WORKER = r"""
import sys
from layerscope.engine.store import cache_from_table, gather_store
mode, out = sys.argv[1], sys.argv[2]
if mode == "gather":
    gather_store(sys.argv[3:], out, log=None)
else:
    shard = None if mode == "all" else tuple(int(x) for x in mode.split("/"))
    cache_from_table(sys.argv[3], out, model={"source": sys.argv[4]},
                     activations={"poolings": ["mean", "last"]},
                     batch_size=64, device="cpu", threads=1, log=None, shard=shard)
"""


def write_table(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = (
        "the quick brown fox jumps over a lazy dog which is larger than or answer sum of".split()
    )
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt_id", "text", "label"])
        for i in range(n):
            a, b = rng.randint(1, 999), rng.randint(1, 999)
            filler = " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))
            w.writerow(
                [f"p{i:06d}", f"{filler}: which is larger, {a} or {b}?", "yes" if a > b else "no"]
            )


def run_job(args: list[str]) -> tuple[float, float]:
    """Run one worker job; return (seconds, peak RSS in MiB) of that process alone."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", WORKER, *args])
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"job failed: {args}")
    return time.perf_counter() - t, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    opts = ap.parse_args()
    per_shard = 500 if opts.quick else PER_SHARD
    totals = [2 * per_shard, 8 * per_shard]
    import h5py
    import numpy as np

    from devkit.tiny_models import build_tiny_model

    root = Path(tempfile.mkdtemp(prefix="bench_sharding_"))
    model = build_tiny_model(
        root / "model", "gpt2", n_layers=4, d_model=64, n_heads=4, n_positions=128
    )
    rows = []
    for total in totals:
        table = root / f"table_{total}.csv"
        write_table(table, total)
        plain = root / f"plain_{total}.h5"
        s, rss = run_job(["all", str(plain), str(table), str(model)])
        rows.append((total, "unsharded cache_activations", 1, s, rss))
        n = total // per_shard
        shards = [root / f"{i}-of-{n}_{total}.h5" for i in range(n)]
        results = [
            run_job([f"{i}/{n}", str(p), str(table), str(model)]) for i, p in enumerate(shards)
        ]
        rows.append(
            (
                total,
                f"cache_shard ({per_shard} prompts each)",
                n,
                max(r[0] for r in results),
                max(r[1] for r in results),
            )
        )
        gathered = root / f"gathered_{total}.h5"
        s, rss = run_job(["gather", str(gathered), *map(str, shards)])
        rows.append((total, "gather_activations", 1, s, rss))
        with h5py.File(plain) as a, h5py.File(gathered) as b:
            for name in ("resid_post/mean", "resid_post/last"):
                assert (
                    np.array_equal(a[name][()], b[name][()]) and a[name].dtype == b[name].dtype
                ), name
    print(f"\n{'prompts':>8}  {'job':<34} {'jobs':>4}  {'s (max)':>8}  {'peak RSS MiB (max)':>18}")
    for total, job, n, s, rss in rows:
        print(f"{total:>8}  {job:<34} {n:>4}  {s:>8.1f}  {rss:>18.0f}")
    print("\ngathered stores equal the unsharded ones array for array (checked)")


if __name__ == "__main__":
    main()
