"""Outputs asked for are written, and only they (issue 13, item 3): after a complete run, turning on
t-SNE or adding a figure format schedules exactly the figure jobs, and the files appear."""

import pytest
import yaml
from conftest import copy_workflow, job_counts, run_snakemake

pytestmark = pytest.mark.slow

PLOT_RULES = {
    "plot_probes",
    "plot_geometry",
    "plot_tsne",
    "plot_task_vectors",
    "depth_comparison",
    "plot_generalization",
    "plot_patching",
    "plot_steering",
    "plot_reliability",
    "plot_attribution",
    "plot_trajectories",
    "plot_early_answering",
}


def _edit(work, **figures):
    path = work / ".test/config/config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg.setdefault("figures", {}).update(figures)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_tsne_and_svg_after_a_complete_run(test_config_run, tmp_path):
    import shutil

    work = copy_workflow(tmp_path)
    shutil.copytree(
        test_config_run, work / ".test", dirs_exist_ok=True
    )  # the completed run, as the user has it
    assert job_counts(run_snakemake(work, "-n", "--directory", ".test").stdout) == {}

    _edit(work, tsne=True)
    counts = job_counts(run_snakemake(work, "-n", "--directory", ".test").stdout)
    # Only the t-SNE jobs (one per dataset), plus the manifest that records the config.
    assert counts == {"plot_tsne": 2, "manifest": 1, "all": 1}, counts
    run_snakemake(work, "--directory", ".test")
    for ds in ("numbers_phase2", "tasks"):
        assert (work / f".test/results/figures/demo/{ds}/tsne.png").stat().st_size > 10_000

    _edit(work, formats=["png", "svg"])
    counts = job_counts(run_snakemake(work, "-n", "--directory", ".test").stdout)
    # Only figure jobs (patching draws in plot_patching), plus the manifest that records the config.
    assert set(counts) - {"manifest", "all"} <= PLOT_RULES, counts
    assert counts["plot_patching"] == 1
    assert (
        counts["plot_geometry"] == 2
        and counts["plot_probes"] == 2
        and counts["plot_task_vectors"] == 1
    )
    assert counts["plot_tsne"] == 2
    run_snakemake(work, "--directory", ".test")
    figures = work / ".test/results/figures/demo"
    for png in figures.rglob("*.png"):
        svg = png.with_suffix(".svg")
        assert svg.exists() and svg.read_text().lstrip().startswith("<?xml"), svg
    assert job_counts(run_snakemake(work, "-n", "--directory", ".test").stdout) == {}
