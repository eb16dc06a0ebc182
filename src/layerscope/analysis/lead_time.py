"""Lead time: how long before it is written the answer is already decodable, per prompt and layer.

For a lens (rank of the answer's first token) the answer is *decodable* at position ``p`` when it
is the lens's top token there (rank 1). The lead time of a (prompt, layer) is measured from the
first position ``p*`` from which it stays decodable through ``a - 1``, the position that writes
the answer: ``lead_tokens = a - 1 - p*`` (0: decodable only where it is written). Where the
answer is not the top token at ``a - 1`` the lead time is undefined (NaN, ``decodable`` False).
``lead_fraction`` divides by the reasoning's length ``a - r``: above 1 means decodable from
inside the question, before any reasoning.

For a probe the same run is read on its score: positions from which the score stays on the side
of its threshold (0: the decision boundary) it has at ``a - 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

LEAD_COLUMNS = (
    "prompt_id",
    "label",
    "readout",
    "layer",
    "decodable",
    "first_position",
    "lead_tokens",
    "lead_fraction",
    "n_reasoning_tokens",
)


def stays_from(ok: np.ndarray) -> int | None:
    """First index from which ``ok`` is True to the end (None when its last entry is False)."""
    ok = np.asarray(ok, dtype=bool)
    if ok.size == 0 or not ok[-1]:
        return None
    bad = np.flatnonzero(~ok)
    return int(bad[-1] + 1) if bad.size else 0


def _row(pid, label, readout, layer, ok, r: int, a: int) -> dict:
    first = stays_from(ok)
    lead = math.nan if first is None else float(a - 1 - first)
    return {
        "prompt_id": pid,
        "label": label,
        "readout": readout,
        "layer": int(layer),
        "decodable": first is not None,
        "first_position": -1 if first is None else first,
        "lead_tokens": lead,
        "lead_fraction": lead / max(a - r, 1),
        "n_reasoning_tokens": a - r,
    }


def lead_times(lens: pd.DataFrame, positions: pd.DataFrame, probes: pd.DataFrame | None = None):
    """lead_time.csv from lens.csv rows (and probe_trajectories.csv rows), one row per (prompt,
    readout, layer); readout is the lens name or the probe name."""
    pos = positions.set_index("prompt_id")
    rows = []
    for (pid, name, L), g in lens.groupby(["prompt_id", "lens", "layer"], sort=False):
        g = g.sort_values("position")
        rec = pos.loc[pid]
        r, a = int(rec["reasoning_start_token"]), int(rec["answer_start_token"])
        rows.append(_row(pid, rec["label"], name, L, g["answer_rank"].to_numpy() == 1, r, a))
    if probes is not None and len(probes):
        for (pid, name, L), g in probes.groupby(["prompt_id", "probe", "layer"], sort=False):
            rec = pos.loc[pid]
            r, a = int(rec["reasoning_start_token"]), int(rec["answer_start_token"])
            s = g.sort_values("position")["score"].to_numpy()[:a]
            rows.append(_row(pid, rec["label"], name, L, (s > 0) == (s[-1] > 0), r, a))
    return pd.DataFrame(rows, columns=list(LEAD_COLUMNS))


def _boot_medians(x: np.ndarray, n_boot: int, rng) -> np.ndarray:
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    return np.median(x[idx], axis=1)


def summarize_lead(
    lead: pd.DataFrame, labels: Sequence[str], *, n_boot: int, seed: int, conf: float
) -> pd.DataFrame:
    """lead_time_summary.csv: per (readout, layer) and label the median lead time (decodable
    prompts) with a percentile bootstrap interval over prompts, the share decodable, and a row
    ``label = "difference"`` (``labels[1]`` minus ``labels[0]``) with its bootstrap interval."""
    alpha = (1.0 - conf) / 2
    rows = []
    for (name, L), g in lead.groupby(["readout", "layer"], sort=True):
        rng = np.random.default_rng([seed, int(L)])
        boots = {}
        for label in labels:
            sub = g[g["label"] == label]
            x = sub.loc[sub["decodable"], "lead_tokens"].to_numpy(dtype=float)
            rec = {"readout": name, "layer": int(L), "label": label, "n": len(sub)}
            rec["n_decodable"] = len(x)
            rec["share_decodable"] = len(x) / len(sub) if len(sub) else math.nan
            if len(x):
                boots[label] = _boot_medians(x, n_boot, rng)
                q = np.quantile(boots[label], [alpha, 1 - alpha])
                rec.update(median=float(np.median(x)), ci_low=float(q[0]), ci_high=float(q[1]))
            else:
                rec.update(median=math.nan, ci_low=math.nan, ci_high=math.nan)
            rows.append(rec)
        rows.append(_difference(name, L, g, labels, boots, alpha))
    return pd.DataFrame(rows)


def _difference(name, L, g, labels, boots, alpha) -> dict:
    """The ``labels[1] - labels[0]`` row: difference of medians and its bootstrap interval."""
    rec = {"readout": name, "layer": int(L), "label": "difference", "n": len(g)}
    rec.update(n_decodable=int(g["decodable"].sum()), share_decodable=math.nan)
    if all(lab in boots for lab in labels[:2]) and len(labels) >= 2:
        d = boots[labels[1]] - boots[labels[0]]
        med = [
            float(np.median(g[(g["label"] == lab) & g["decodable"]]["lead_tokens"]))
            for lab in labels[:2]
        ]
        q = np.quantile(d, [alpha, 1 - alpha])
        rec.update(median=med[1] - med[0], ci_low=float(q[0]), ci_high=float(q[1]))
    else:
        rec.update(median=math.nan, ci_low=math.nan, ci_high=math.nan)
    return rec
