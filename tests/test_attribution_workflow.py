"""The attribution rules as Snakemake runs them: the demo's screen experiment, its outputs, and
which config edits rerun it (attribution keys rerun the attribution job alone, not the exact sweep;
generation settings do not rerun it)."""

import json

import pandas as pd
import pytest
import yaml
from conftest import copy_workflow, job_counts, run_snakemake

pytestmark = pytest.mark.slow

TARGETS = [
    "results/figures/demo/attribution_numbers_screen.png",
    "results/figures/demo/attribution_numbers_screen_scatter.png",
]


def _edit(work, fn):
    path = work / "config/config.yaml"
    cfg = yaml.safe_load(path.read_text())
    fn(cfg)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_screen_experiment_outputs_and_what_reruns(tmp_path):
    """About 40 s: one attribution job (with its exact verification) and one plot job."""
    work = copy_workflow(tmp_path)
    _edit(
        work,
        lambda c: c["patching"].update(
            components=["resid_post", "mlp_out"], positions=3, heads=False
        ),
    )
    assert job_counts(run_snakemake(work, *TARGETS, "-n").stdout) == {
        "attribution": 1,
        "plot_attribution": 1,
    }
    run_snakemake(work, *TARGETS)
    out = work / "results/patching/demo/numbers_screen"
    table = pd.read_csv(out / "attribution.csv", keep_default_na=False, na_values=[""])
    assert set(table.component) == {"resid_post", "mlp_out"}
    assert table["verified"].sum() > 10 and table["exact"].notna().sum() == table["verified"].sum()
    summary = json.loads((out / "attribution_summary.json").read_text())
    assert summary["miss_rate"]["statement"].startswith("at most")
    assert summary["degenerate"] is None
    assert (work / "benchmarks/attribution/demo/numbers_screen.tsv").exists()
    # an attribution key reruns the attribution job only (the exact sweep's params lack it)
    _edit(work, lambda c: c["patching"]["attribution"].update(top_k=5))
    assert job_counts(run_snakemake(work, *TARGETS, "-n").stdout) == {
        "attribution": 1,
        "plot_attribution": 1,
    }
    _edit(work, lambda c: c["patching"]["attribution"].update(top_k=10))
    # generation settings are not the attribution job's
    _edit(work, lambda c: c["patching"]["generation"].update(max_new_tokens=3))
    assert job_counts(run_snakemake(work, *TARGETS, "-n").stdout) == {}
