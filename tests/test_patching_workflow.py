"""The patching rules as Snakemake runs them: compute (GPU-tagged) and plot jobs apart, what
reruns."""

import pandas as pd
import pytest
import yaml
from conftest import copy_workflow, job_counts, run_snakemake

pytestmark = pytest.mark.slow


def _targets(cfg):
    """The patching figures in every configured format (what the default target asks for)."""
    names = ("", "_generation") if cfg["patching"]["generation"]["enabled"] else ("",)
    return [
        f"results/figures/demo/patching_numbers{name}.{fmt}"
        for name in names
        for fmt in cfg["figures"]["formats"]
    ]


def _config(work):
    cfg = yaml.safe_load((work / "config/config.yaml").read_text())
    cfg["patching"].update(components=["resid_post"], positions=2, heads=False)
    cfg["patching"]["generation"] = {
        "enabled": True,
        "layers": [4, 5],
        "positions": ["diff", "gen1"],
        "ranges": ["prompt"],
        "max_new_tokens": 4,
    }
    return cfg


def _write(work, cfg):
    (work / "config/config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_patching_outputs_and_what_reruns(tmp_path):
    work = copy_workflow(tmp_path)
    cfg = _config(work)
    _write(work, cfg)
    assert job_counts(run_snakemake(work, *_targets(cfg), "-n").stdout) == {
        "patching": 1,
        "plot_patching": 1,
    }
    run_snakemake(work, *_targets(cfg))
    out = work / "results/patching/demo/numbers"
    rows = pd.read_csv(out / "generation.csv", dtype={"position": str})
    assert {
        "pair_id",
        "component",
        "layer",
        "position",
        "matches_clean",
        "matches_corrupted",
        "generated_text",
    } <= set(rows.columns)
    assert len(rows) == 16 * (
        2 + 2 * 3
    )  # two unpatched runs + 2 layers x (diff, gen1, prompt) per pair
    summary = pd.read_csv(out / "generation_summary.csv", dtype={"position": str})
    assert {
        "recovery_rate",
        "ci_low",
        "ci_high",
        "n_for_half_width",
        "n_for_power",
        "logit_recovery",
    } <= set(summary.columns)
    for fig in ("patching_numbers.png", "patching_numbers_generation.png"):
        assert (work / "results/figures/demo" / fig).stat().st_size > 10_000

    # A new figure format: only the plot job.
    cfg["figures"]["formats"] = ["png", "svg"]
    _write(work, cfg)
    assert job_counts(run_snakemake(work, *_targets(cfg), "-n").stdout) == {"plot_patching": 1}
    run_snakemake(work, *_targets(cfg))
    assert (work / "results/figures/demo/patching_numbers_generation.svg").exists()

    # Generation settings and precision goals change the computed tables: the compute job and its
    # plot.
    for edit in (
        lambda c: c["patching"]["generation"].update(max_new_tokens=5),
        lambda c: c.setdefault("precision", {}).update(half_width=0.05),
    ):
        edit(cfg)
        _write(work, cfg)
        counts = job_counts(run_snakemake(work, *_targets(cfg), "-n").stdout)
        assert counts == {"patching": 1, "plot_patching": 1}

    # Generation off: the generation keys no longer reach the compute job's params.
    cfg["patching"]["generation"]["enabled"] = False
    _write(work, cfg)
    run_snakemake(work, *_targets(cfg))
    cfg["patching"]["generation"]["max_new_tokens"] = 7
    _write(work, cfg)
    assert job_counts(run_snakemake(work, *_targets(cfg), "-n").stdout) == {}
