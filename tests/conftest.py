import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def result_differences(a: Path, b: Path) -> list[str]:
    """Every way two ``results/`` trees differ: missing files, differing bytes of tables, JSON and
    figures, and HDF5 datasets whose values (floats compared bit for bit) are not the same."""
    import h5py

    diffs = []
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    diffs += [f"only in {a}: {p}" for p in sorted(set(files_a) - set(files_b))]
    diffs += [f"only in {b}: {p}" for p in sorted(set(files_b) - set(files_a))]
    for rel in sorted(set(files_a) & set(files_b)):
        pa, pb = a / rel, b / rel
        if rel.suffix != ".h5":
            if pa.read_bytes() != pb.read_bytes():
                diffs.append(f"bytes differ: {rel}")
            continue
        with h5py.File(pa) as fa, h5py.File(pb) as fb:
            names_a, names_b = _dataset_names(fa), _dataset_names(fb)
            if names_a != names_b:
                diffs.append(f"datasets differ: {rel}: {names_a} vs {names_b}")
                continue
            for name in names_a:
                x, y = fa[name][()], fb[name][()]
                same = (
                    x.dtype == y.dtype
                    and x.shape == y.shape
                    and (
                        x.tolist() == y.tolist()
                        if x.dtype.kind == "O"
                        else x.tobytes() == y.tobytes()
                    )
                )
                if not same:
                    diffs.append(f"values differ: {rel}:{name}")
    return diffs


def _dataset_names(f) -> list[str]:
    """Names of every dataset in an open HDF5 file, in visiting order."""
    import h5py

    names: list[str] = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return names


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def test_config_run(tmp_path_factory) -> Path:
    """One local run of the .test config (shared by the reproducibility and SLURM tests)."""
    work = copy_workflow(tmp_path_factory.mktemp("local_run"))
    run_snakemake(work, "--directory", ".test")
    return work / ".test"
