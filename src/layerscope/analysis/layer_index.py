"""The cross-layer index of one (model, dataset): which layer files exist, their shapes and norms.

It is the aggregate that depends on every configured layer, so it is what reruns when a layer is
added or removed; reading every file through ``read_layers`` also proves they belong together.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import pandas as pd

from layerscope.atomic import write_csv
from layerscope.data.h5cache import layer_attrs, read_layers

COLUMNS = ["layer", "component", "pooling", "n_prompts", "d_model", "mean_norm", "std_norm", "file"]


def layer_index(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    paths = [os.fspath(p) for p in paths]
    rows = []
    attrs = layer_attrs(paths[0]) if paths else {}
    for component in attrs.get("components", []):
        for pooling in attrs.get("poolings", []):
            for layer, data in read_layers(paths, component, pooling).items():
                norms = np.linalg.norm(data.X.astype(np.float64), axis=1)
                rows.append(
                    {
                        "layer": layer,
                        "component": component,
                        "pooling": pooling,
                        "n_prompts": data.X.shape[0],
                        "d_model": data.X.shape[1],
                        "mean_norm": float(norms.mean()),
                        "std_norm": float(norms.std(ddof=1)) if len(norms) > 1 else 0.0,
                        "file": data.path,
                    }
                )
    return pd.DataFrame(rows, columns=COLUMNS).sort_values(
        ["component", "pooling", "layer"], kind="stable"
    )


def write_layer_index(
    paths: Iterable[str | os.PathLike], out_csv: str | os.PathLike
) -> pd.DataFrame:
    table = layer_index(paths)
    write_csv(out_csv, table)
    return table
