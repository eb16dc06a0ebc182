"""Probe time with the old permutation default (100, one stream) against the sequential default
(up to 1,000, stopping 3 Monte-Carlo s.e. from 0.05), side by side on the same layer files.

    python bench/bench_permutations.py results/activations/demo/*/layer_*.h5

Reports CPU seconds (process time, so other load on the machine matters less) per setting, their
ratio, and how many permutations the sequential test drew per probe.
"""

from __future__ import annotations

import sys
import time

from layerscope.analysis.probes import fit_probe
from layerscope.data.h5cache import layer_attrs, read_layer

SETTINGS = dict(n_splits=5, n_repeats=3, n_random_directions=20, seed=0)


def main(paths: list[str]) -> None:
    totals = {"old (100)": 0.0, "sequential (<= 1000)": 0.0}
    drawn = []
    for path in paths:
        attrs = layer_attrs(path)
        for pooling in attrs["poolings"]:
            d = read_layer(path, attrs["components"][0], pooling)
            groups = d.groups if d.groups is not None else d.prompt_ids
            for name, n_perm in (("old (100)", 100), ("sequential (<= 1000)", 1000)):
                t = time.process_time()
                r = fit_probe(
                    d.X,
                    d.labels,
                    groups,
                    n_permutations=n_perm,
                    stream=(attrs["layer"], 0, 0),
                    **SETTINGS,
                )
                totals[name] += time.process_time() - t
                if n_perm == 1000:
                    drawn.append(r.permutation["n_drawn"])
                    print(
                        f"{path} {pooling}: p={r.permutation['p_value']:.4f} "
                        f"(s.e. {r.permutation['mc_se']:.4f}), {r.permutation['n_drawn']} drawn",
                        flush=True,
                    )
    old, new = totals["old (100)"], totals["sequential (<= 1000)"]
    print(
        f"{len(drawn)} probes: old {old:.1f} s CPU, sequential {new:.1f} s CPU, "
        f"ratio {new / old:.2f}; "
        f"permutations drawn: {sorted(drawn)}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
