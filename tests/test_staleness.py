"""A config edit reruns exactly the jobs it affects (issue 23).

Snakemake keeps an existing output whose input file is missing, and reruns on config only through
params: so every file a job's settings name must be a declared input, and every file the config
names must be read at parse time (a missing one then stops the dry run naming the key).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, copy_workflow, job_counts, run_snakemake

pytestmark = pytest.mark.slow

# The manifest records the whole config (names of files included) and reads none of its data files.
RECORD_ONLY = {("manifest", "config_json")}


def dag_jobs(work: Path, configfile: str | None = None, directory: str | None = None) -> list[dict]:
    extra = ([configfile] if configfile else []) + (["--directory", directory] if directory else [])
    cmd = [sys.executable, "-m", "devkit.dag_walk", str(work), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("DAG-JOBS "))
    return json.loads(line.removeprefix("DAG-JOBS "))


def strings(value):
    """Every string inside a params value (JSON text is parsed first)."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            yield value
            return
        if isinstance(parsed, str):
            yield parsed
        else:
            yield from strings(parsed)
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from strings(v)


def named_paths(job: dict, root: Path) -> set[str]:
    """Strings in the job's params that name an existing file or directory (as written)."""
    out = set()
    for key, value in job["params"].items():
        if (job["rule"], key) in RECORD_ONLY:
            continue
        out |= {s for s in strings(value) if ("/" in s or "." in s) and (root / s).exists()}
    return out


def declared(path: str, inputs: list[str]) -> bool:
    norm = str(Path(path))
    return any(str(Path(i)) == norm or str(Path(i)).startswith(norm + "/") for i in inputs)


def _walk_config(work: Path) -> dict:
    """The demo config with one steering experiment of every direction source (files included)."""
    cfg = yaml.safe_load((work / "config/config.yaml").read_text())
    np.save(work / "direction.npy", np.random.default_rng(0).standard_normal(128))
    base = {"layers": [1, 3], "alphas": [-1, 1], "neutral": "demo/data/steering/neutral.txt"}
    exps = cfg["steering"]["experiments"]
    exps["from_file"] = {
        **base,
        "prompts": "demo/data/steering/numbers.csv",
        "direction": {"source": "file", "path": "direction.npy"},
    }
    exps["from_dataset"] = {
        **base,
        "dataset": "facts_located_in",
        "targets": {"positive": " yes", "negative": " no"},
        "direction": {"source": "mass_mean", "dataset": "facts_located_in"},
    }
    exps["from_tasks"] = {
        **base,
        "prompts": "demo/data/steering/numbers.csv",
        "direction": {"source": "task_vector", "dataset": "tasks", "task": "sum"},
    }
    return cfg


def test_every_file_a_job_setting_names_is_a_declared_input(tmp_path):
    """Every job of the demo config plus file, dataset, mass-mean and task-vector steering."""
    work = copy_workflow(tmp_path)
    (work / "walk.yaml").write_text(yaml.safe_dump(_walk_config(work)))
    jobs = dag_jobs(work, "walk.yaml")
    rules = {j["rule"] for j in jobs}
    assert {"steering", "patching", "prepare_dataset", "manifest"} <= rules
    seen, missing = set(), []
    for job in jobs:
        for path in named_paths(job, work):
            seen.add(path)
            if not declared(path, job["input"]):
                missing.append((job["rule"], path))
    assert not missing, f"files named by settings but not inputs: {sorted(set(missing))}"
    # The walk saw the files of every kind (it would pass vacuously otherwise).
    for path in (
        "direction.npy",
        "demo/data/steering/neutral.txt",
        "demo/data/steering/numbers.csv",
        "demo/data/facts.csv",
        "demo/model",
    ):
        assert path in seen, path
    # The pairs file is no setting of the patching job (its path change reruns it as an input).
    patching = [j for j in jobs if j["rule"] == "patching"]
    assert patching and all("demo/data/patching_pairs.csv" in j["input"] for j in patching)


def test_walk_finds_an_undeclared_file(tmp_path):
    """The check itself: a job whose settings name a file that is not an input is reported."""
    (tmp_path / "x.csv").write_text("a\n")
    job = {"rule": "r", "input": ["y.csv"], "params": {"s": json.dumps({"path": "x.csv"})}}
    assert named_paths(job, tmp_path) == {"x.csv"}
    assert not declared("x.csv", job["input"])


# ------------------------------------------------------------------------------------------------
# edits on a completed run of the .test config


def _config_files(node, parts=()):
    """(key path, value) of every string in the config that names an existing file."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _config_files(v, (*parts, k))
    elif isinstance(node, str) and node.startswith("../demo/data/"):
        yield parts, node


def _set(cfg, parts, value):
    for p in parts[:-1]:
        cfg = cfg[p]
    cfg[parts[-1]] = value


@pytest.fixture(scope="module")
def done(test_config_run, tmp_path_factory):
    """A copy of the completed .test run and its DAG (which rules name which files)."""
    work = copy_workflow(tmp_path_factory.mktemp("edits"))
    shutil.copytree(test_config_run, work / ".test", dirs_exist_ok=True)
    assert job_counts(run_snakemake(work, "-n", "--directory", ".test").stdout) == {}
    return work


def _dry_run(work: Path, cfg: dict, check: bool = True):
    (work / ".test/config/config.yaml").write_text(yaml.safe_dump(cfg))
    return run_snakemake(work, "-n", "--directory", ".test", check=check)


def test_each_file_edit_reruns_the_jobs_that_read_it(done):
    """Over a minute: one dry run per file key (renamed copy, then missing) of the .test config."""
    original = (done / ".test/config/config.yaml").read_text()
    readers = {}
    for job in dag_jobs(done, directory=".test"):
        # a rule reads a file its settings name, or one it declares (the pairs file is no setting)
        for path in named_paths(job, done / ".test") | set(job["input"]):
            readers.setdefault(str(Path(path)), set()).add(job["rule"])
    keys = list(_config_files(yaml.safe_load(original)))
    assert len(keys) >= 5, keys
    try:
        for parts, path in keys:
            key = ".".join(parts)
            copy = Path(path).with_name("edited_" + Path(path).name)
            shutil.copy(done / ".test" / path, done / ".test" / copy)
            cfg = yaml.safe_load(original)
            _set(cfg, parts, str(copy))
            counts = job_counts(_dry_run(done, cfg).stdout)
            expected = readers[str(Path(path))]
            assert expected <= set(counts), (key, expected, counts)
            _set(cfg, parts, "../demo/data/no_such_file.csv")
            proc = _dry_run(done, cfg, check=False)
            out = proc.stdout + proc.stderr
            assert proc.returncode != 0 and key in out and "no_such_file" in out, (key, out)
            assert 'File "' not in out, out
    finally:
        (done / ".test/config/config.yaml").write_text(original)


@pytest.mark.parametrize(
    "key, value, rule",
    [
        (("steering", "experiments", "numbers", "alphas"), [-2, 0, 2], "steering"),
        (("steering", "experiments", "numbers", "positions"), -1, "steering"),
        (("patching", "n_boot"), 500, "patching"),
        (("probes", "n_permutations"), 30, "train_probe"),
        (("task_vectors", "n_boot"), 300, "task_vectors"),
    ],
)
def test_a_setting_edit_reruns_its_job(done, key, value, rule):
    original = (done / ".test/config/config.yaml").read_text()
    cfg = yaml.safe_load(original)
    _set(cfg, key, value)
    try:
        counts = job_counts(_dry_run(done, cfg).stdout)
    finally:
        (done / ".test/config/config.yaml").write_text(original)
    assert rule in counts, counts
    assert "cache_activations" not in counts, counts


def test_steering_direction_edit_reruns_steering(done, tmp_path):
    """The issue's case: a completed probe-direction run switched to a user file reruns steering."""
    original = (done / ".test/config/config.yaml").read_text()
    np.save(done / ".test/dir.npy", np.ones(128))
    cfg = yaml.safe_load(original)
    cfg["steering"]["experiments"]["numbers"]["direction"] = {"source": "file", "path": "dir.npy"}
    try:
        counts = job_counts(_dry_run(done, cfg).stdout)
        cfg["steering"]["experiments"]["numbers"]["direction"]["path"] = "nodir.npy"
        proc = _dry_run(done, cfg, check=False)
    finally:
        (done / ".test/config/config.yaml").write_text(original)
    assert {"steering", "plot_steering"} <= set(counts), counts
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "steering.experiments.numbers.direction.path" in out and "nodir.npy" in out, out
