"""CPU cost of the probe-validity checks (issue 20) beside the probe fit itself, on the same layer
files: ``fit_probe`` with the workflow's defaults (sequential permutations, 20 random directions),
then ``probe_validity`` (mass-mean and LDA on the same folds, the control task for every family,
selectivity, calibration and recall intervals with 1,000 resamples).

    python bench/bench_probe_validity.py results/activations/demo/*/layer_*.h5

Reports CPU seconds (process time, so other load on the machine matters less) of each part, and
the ratio of the added checks to the probe fit.
"""

from __future__ import annotations

import sys
import time

from threadpoolctl import threadpool_limits

from layerscope.analysis.probes import fit_probe
from layerscope.analysis.validity import probe_validity
from layerscope.data.h5cache import layer_attrs, read_layer

SETTINGS = dict(n_splits=5, n_repeats=3, n_permutations=1000, n_random_directions=20, seed=0)


def main(paths: list[str]) -> None:
    fit = checks = 0.0
    views = 0
    for path in paths:
        attrs = layer_attrs(path)
        for pooling in attrs["poolings"]:
            d = read_layer(path, attrs["components"][0], pooling)
            groups = d.groups if d.groups is not None else d.prompt_ids
            t = time.process_time()
            res = fit_probe(d.X, d.labels, groups, **SETTINGS)
            fit += time.process_time() - t
            t = time.process_time()
            with threadpool_limits(limits=1):
                probe_validity(d.X, d.labels, groups, res)
            checks += time.process_time() - t
            views += 1
    print(f"{len(paths)} layer files, {views} probes")
    print(f"probe fit (logistic, permutations, random directions): {fit:.1f} CPU s")
    print(f"validity checks (families, control task, intervals):   {checks:.1f} CPU s")
    print(f"added / fit: {checks / fit:.2f}; per probe {checks / views:.2f} CPU s")


if __name__ == "__main__":
    main(sys.argv[1:])
