"""The Snakemake workflow as a user runs it: lint, dry run, the demo job, and what reruns after a
config edit."""

import re
import subprocess
import sys

import h5py
import pandas as pd
import pytest
import yaml
from conftest import copy_workflow, job_counts, run_snakemake

pytestmark = pytest.mark.slow


def test_lint_is_clean(repo):
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert not re.search(r"lints for|warning", out, re.IGNORECASE), out


def test_dry_run_lists_jobs_for_default_config(tmp_path):
    work = copy_workflow(tmp_path)
    proc = run_snakemake(work, "-n")
    counts = job_counts(proc.stdout)
    config = yaml.safe_load((work / "config/config.yaml").read_text())
    n_datasets = len(config["datasets"])
    # Chain-of-thought datasets are read along positions (trajectories), not cached pooled.
    n_cot = len(config.get("cot", {}).get("datasets", []))
    assert counts["prepare_dataset"] == n_datasets
    assert counts["cache_activations"] == (n_datasets - n_cot) * len(config["models"])
    assert counts["layer_index"] == (n_datasets - n_cot) * len(config["models"])
    assert counts["trajectories"] == n_cot * len(config["models"])
    assert counts["extract_layer"] > 0


def test_bad_config_fails_before_any_job(tmp_path):
    work = copy_workflow(tmp_path)
    cfg = yaml.safe_load((work / "config/config.yaml").read_text())
    cfg["models"]["demo"]["layers"] = [0, 99]
    (work / "config/config.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(work, "-n", check=False)
    assert proc.returncode != 0
    assert "models.demo.layers" in proc.stdout + proc.stderr
    assert "99" in proc.stdout + proc.stderr
    assert not (work / "results").exists()


def _small_config(work, **model_overrides):
    """The demo config narrowed to two datasets, three layers and cheap probe settings."""
    cfg = yaml.safe_load((work / "config/config.yaml").read_text())
    cfg["datasets"] = {k: cfg["datasets"][k] for k in ("numbers_phase2", "tasks")}
    cfg["models"]["demo"]["layers"] = [1, 3, 5]
    cfg["models"]["demo"].update(model_overrides)
    cfg["activations"]["components"] = ["resid_post"]
    cfg["probes"].update(n_repeats=1, n_permutations=20, n_random_directions=5, generalization={})
    cfg["task_vectors"].update(n_boot=200, layer=3)
    cfg["patching"].update(components=["resid_post"], positions=2, heads=False)
    cfg["patching"]["generation"]["enabled"] = False  # covered by test_patching_workflow.py
    cfg["steering"][
        "experiments"
    ] = {}  # covered by test_steering.py (its demo experiments need other datasets)
    cfg.pop("cot", None)  # covered by test_cot_workflow.py (its dataset is not kept here)
    return cfg


def _write(work, cfg):
    (work / "config/config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_demo_run_and_rerun_only_changed_layers(tmp_path):
    work = copy_workflow(tmp_path)
    cfg = _small_config(work)
    _write(work, cfg)
    run_snakemake(work)

    for ds in ("numbers_phase2", "tasks"):
        table = pd.read_csv(
            work / f"results/datasets/{ds}/prompts.csv", dtype=str, keep_default_na=False
        )
        assert list(table.columns[:4]) == ["prompt_id", "text", "label", "group"]
        for layer in (1, 3, 5):
            with h5py.File(work / f"results/activations/demo/{ds}/layer_{layer}.h5") as f:
                assert f.attrs["layer"] == layer
                assert f["resid_post/mean"].shape[0] == len(table)
                assert [p.decode() for p in f["prompt_id"][:]] == table["prompt_id"].tolist()

    assert job_counts(run_snakemake(work, "-n").stdout) == {}
    for fig in (
        "probe_metric_vs_layer",
        "pca",
        "cosine",
        "label_means",
        "norm_heatmap",
        "norm_curves",
    ):
        assert (work / f"results/figures/demo/numbers_phase2/{fig}.png").stat().st_size > 10_000
    summary = pd.read_csv(work / "results/probes/demo/numbers_phase2/summary.csv")
    assert sorted(summary.layer.unique()) == [1, 3, 5]
    assert set(summary.pooling) == {"mean", "last"}
    assert (work / "results/task_vectors/demo/tasks/scores.csv").exists()
    assert (work / "results/figures/demo/patching_numbers.png").exists()
    report = run_snakemake(work, "--report", "results/report.html")
    assert "warning" not in (report.stdout + report.stderr).lower()
    assert (work / "results/report.html").stat().st_size > 100_000

    # Adding a layer: no forward pass; that layer's file and probes, and the cross-layer aggregates.
    # (Every config edit also rewrites the run manifest, which records the config.)
    per_layer_aggregates = {
        "layer_index": 2,
        "probe_summary": 2,
        "probe_card": 2,
        "plot_reliability": 2,
        "activation_stats": 2,
        "plot_probes": 2,
        "plot_geometry": 2,
        "task_vectors": 1,
        "plot_task_vectors": 1,
        "manifest": 1,
        "all": 1,
    }
    cfg["models"]["demo"]["layers"] = [1, 2, 3, 5]
    _write(work, cfg)
    counts = job_counts(run_snakemake(work, "-n").stdout)
    assert counts == {**per_layer_aggregates, "extract_layer": 2, "train_probe": 2}
    run_snakemake(work)
    assert (work / "results/probes/demo/tasks/layer_2.json").exists()

    # Removing a layer: only the aggregates are rebuilt.
    cfg["models"]["demo"]["layers"] = [1, 3, 5]
    _write(work, cfg)
    assert job_counts(run_snakemake(work, "-n").stdout) == per_layer_aggregates
    run_snakemake(work)

    # A batch-size edit changes nothing numerically and reruns nothing but the manifest.
    cfg["models"]["demo"]["batch_size"] = 7
    _write(work, cfg)
    assert job_counts(run_snakemake(work, "-n").stdout) == {"manifest": 1, "all": 1}

    # Changing the dtype changes every cached number: everything downstream of the model reruns.
    cfg["models"]["demo"]["dtype"] = "bfloat16"
    _write(work, cfg)
    counts = job_counts(run_snakemake(work, "-n").stdout)
    assert counts == {
        **per_layer_aggregates,
        "cache_activations": 2,
        "extract_layer": 6,
        "train_probe": 6,
        "patching": 1,
        "plot_patching": 1,
        "attribution": 1,  # the demo's numbers_screen experiment
        "plot_attribution": 1,
    }
