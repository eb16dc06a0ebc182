import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devkit.compare import result_differences  # noqa: F401 (tests import it from here)

REPO = Path(__file__).resolve().parents[1]

# Never let a test reach for the model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def copy_workflow(dest: Path) -> Path:
    """A throwaway copy of the workflow (code, config, demo data and model) to run Snakemake in."""
    for name in ("Snakefile", "workflow", "config", "demo", "profiles", "envs", ".test"):
        src = REPO / name
        if src.is_dir():
            # .test keeps only its config: results of a developer's own run must not leak in.
            ignore = ("__pycache__", "results", "logs", "benchmarks", ".snakemake")
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns(*ignore))
        else:
            shutil.copy2(src, dest / name)
    return dest


def run_snakemake(
    workdir: Path, *args: str, check: bool = True, timeout: int = 600
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def job_counts(output: str) -> dict[str, int]:
    """Parse the 'Job stats' table of a Snakemake dry run into {rule: count} (no 'total')."""
    counts: dict[str, int] = {}
    lines = output.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.split() == ["job", "count"])
    except StopIteration:
        return counts  # "Nothing to be done"
    for line in lines[start + 2 :]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def test_config_run(tmp_path_factory) -> Path:
    """One local run of the .test config, read (never written) by the methods-doc, staleness,
    reproducibility, asked-outputs and SLURM tests.

    One run for the whole session, not one per xdist worker: the first worker to ask builds it
    under a file lock in the directory all workers share, the others wait for it and read it (a
    run is ~2 CPU minutes; the second one was the suite's largest duplicate cost)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by every worker of this session
    work, ok = root / "local_run", root / "local_run.ok"
    with FileLock(str(root / "local_run.lock")):
        if not ok.exists():
            shutil.rmtree(work, ignore_errors=True)  # a worker's failed attempt
            work.mkdir()
            run_snakemake(copy_workflow(work), "--directory", ".test")
            ok.touch()
    return work / ".test"
