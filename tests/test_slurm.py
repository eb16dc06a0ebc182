"""The .test config through a real (one-node, throwaway) SLURM with the project's SLURM profile.

Starts munged/slurmctld/slurmd itself (tests/slurm_cluster.py), submits with
``--executor slurm --profile profiles/slurm``, and checks what reached the scheduler: GPU rules
asked for a GPU on the gpu partition and saw CUDA_VISIBLE_DEVICES, cheap CPU rules went out
grouped or ran locally, and every output equals a local run. Skips only where a cluster
cannot be started (not root, SLURM not installed); .ci/run installs it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import copy_workflow, result_differences
from slurm_cluster import Cluster, unavailable_reason

pytestmark = pytest.mark.slow

GPU_RULES = ("cache_activations", "cache_shard", "patching")
TIMEOUT_S = 1200


def _run_with_timeout(cmd, cwd, timeout):
    """Run in its own session; on timeout kill the whole group (the plugin may ignore SIGTERM)."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        raise AssertionError(
            f"snakemake on SLURM did not finish in {timeout} s:\n{out[-5000:]}"
        ) from None
    return proc.returncode, out


def test_slurm_run_matches_local_run(test_config_run, tmp_path):
    reason = unavailable_reason()
    if reason and os.environ.get("LAYERSCOPE_REQUIRE_SLURM"):
        pytest.fail(f"LAYERSCOPE_REQUIRE_SLURM is set but no cluster can be started: {reason}")
    if reason:
        pytest.skip(reason)
    (tmp_path / "work").mkdir()
    work = copy_workflow(tmp_path / "work")
    # The daemons' Unix sockets live under the cluster folder, and a socket path may not exceed 108
    # bytes: pytest-xdist's tmp_path (…/popen-gwN/test_slurm_run_matches_local_r0/…) is too long.
    short = Path(tempfile.mkdtemp(prefix="lsslurm-", dir="/tmp"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, short, ignore_errors=True)
        cluster = stack.enter_context(Cluster(short))
        start = time.monotonic()
        rc, out = _run_with_timeout(
            [
                sys.executable,
                "-m",
                "snakemake",
                "--profile",
                "profiles/slurm",
                "--directory",
                ".test",
                # cluster-side speed-up only: the first status check after 1 s instead of 40 s
                "--slurm-init-seconds-before-status-checks",
                "1",
                "--verbose",
            ],
            work,
            TIMEOUT_S,
        )
        wall = time.monotonic() - start
        jobs = cluster.jobs()
        (tmp_path / "snakemake.out").write_text(out)
    assert rc == 0, out[-8000:] + "\n" + cluster.logs()

    # What went to the scheduler. One record per SLURM job, kept by MinJobAge.
    records = [r for r in jobs.split("\n\n") if "JobId=" in r]
    by_rule = {}
    for rec in records:
        rule = re.search(r"Comment=rule_(\w+?)(?:_wildcards_\S*)?\s", rec + " ").group(1)
        by_rule.setdefault(rule, []).append(rec)
        assert "JobState=COMPLETED" in rec, rec
    sbatch = [line for line in out.splitlines() if line.startswith("sbatch call:")]
    assert len(sbatch) == len(records)
    for rule in GPU_RULES:
        assert by_rule.get(rule), f"{rule} never submitted: {sorted(by_rule)}"
        for rec in by_rule[rule]:
            assert "TresPerJob=gres:gpu:1" in rec and "Partition=gpu" in rec, rec
        calls = [c for c in sbatch if f"--comment rule_{rule}_" in c]
        assert calls and all("--gpus=1" in c and " -p gpu " in c for c in calls), calls
    assert len(by_rule["cache_shard"]) == 2  # .test shards numbers_phase2 in two
    # GPU jobs saw the GPU SLURM gave them.
    gpu_logs = list((work / ".test/logs/cache_shard").rglob("*.log")) + list(
        (work / ".test/logs/patching").rglob("*.log")
    )
    assert len(gpu_logs) == 3
    for log in gpu_logs:
        assert re.search(r"CUDA_VISIBLE_DEVICES=[01]\b", log.read_text()), log.read_text()
    # Cheap CPU rules: grouped (one job per group) or run locally, never one job each.
    assert "extract_layer" not in by_rule and "train_probe" not in by_rule
    assert "per_layer_extract_layer_train_probe" in by_rule
    for local in ("prepare_dataset", "layer_index", "all"):
        assert local not in by_rule
    n_jobs = len(re.findall(r"^\s*(?:local)?rule \w+:", out, re.MULTILINE))
    print(
        f"\nSLURM run: {wall:.0f} s wall, {len(records)} SLURM jobs for {n_jobs} Snakemake jobs; "
        f"per rule: { {k: len(v) for k, v in sorted(by_rule.items())} }"
    )
    # The scheduler-facing part of a GPU job's sbatch line (the wrapped snakemake command is long).
    print(
        "sbatch line of a GPU rule:",
        next(c for c in sbatch if "--comment rule_cache_shard_" in c).split(" --wrap=")[0],
    )

    # Same numbers as a local run of the same config.
    assert result_differences(test_config_run / "results", work / ".test/results") == []
