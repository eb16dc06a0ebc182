"""Crash safety: a caching job killed with SIGKILL mid-write leaves nothing a later step accepts,
and the next run redoes exactly that job and writes the same numbers as an uninterrupted run."""

import base64
import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import psutil
import pytest
import yaml
from conftest import copy_workflow, job_counts, run_snakemake

from layerscope.atomic import atomic_path, remove_stale_temps, temp_pattern
from layerscope.data import h5cache
from layerscope.engine.store import extract_layer
from layerscope.errors import LayerscopeError

DS = "big"
N_PROMPTS = 300
# One torch thread for the caching job (and the reference): numbers equal bit for bit, and no
# OpenMP spin-waiting when the 2 cores are shared with other processes.
ONE_THREAD = ("--set-threads=cache_activations=1",)  # "=": the option takes several values
STORE = f"results/activations/demo/{DS}/store.h5"
LAYER = f"results/activations/demo/{DS}/layer_3.h5"
# Token-level vectors of all 6 layers outgrow h5py's 8 MB chunk cache after ~2k tokens
# (~100 prompts), so from then on pooled data really lands in the temporary file.
PARTIAL_BYTES = 1 << 20
# A rejected file: either HDF5 cannot even open it (metadata never flushed) or it lacks `complete`.
REJECTED = "(incomplete activation file|not a readable HDF5 file)"


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A workflow copy with one labelled dataset of N_PROMPTS prompts (table already built),
    batch_size 1 so that caching takes seconds; each test runs in its own copy of it."""
    work = copy_workflow(tmp_path_factory.mktemp("faults"))
    with open(work / "big.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(N_PROMPTS):
            parity = "even" if i % 2 == 0 else "odd"
            w.writerow(
                [f"Prompt {i}: the number {i * 7919 % 10007} is said to be {parity} here", parity]
            )
    cfg = yaml.safe_load((work / "config/config.yaml").read_text())
    cfg["datasets"] = {DS: {"kind": "labelled", "path": "big.csv"}}
    cfg["models"]["demo"].update(batch_size=1, device="cpu", layers="all")
    cfg["activations"]["token_level_layers"] = list(range(6))
    cfg["probes"]["generalization"] = {}
    cfg["patching"]["experiments"] = {}
    cfg["steering"]["experiments"] = {}
    cfg.pop("cot", None)  # its chain-of-thought dataset is not in this config
    (work / "config/config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_snakemake(work, f"results/datasets/{DS}/prompts.csv", timeout=300)
    return work


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    """The store of an uninterrupted run with the job's settings (one thread, batch_size 1).

    Computed in a background process while the first test kills and reruns its job (the two
    share the 2 cores); calling the returned function waits for it and gives its path.
    """
    cfg = yaml.safe_load((prepared / "config/config.yaml").read_text())
    m = cfg["models"]["demo"]
    out = tmp_path_factory.mktemp("reference") / "store.h5"
    # The workflow caches from prompt ids and texts alone (labels join at layer extraction).
    texts = out.parent / "texts.csv"
    table = pd.read_csv(
        prepared / f"results/datasets/{DS}/prompts.csv", dtype=str, keep_default_na=False
    )
    table[["prompt_id", "text"]].to_csv(texts, index=False, lineterminator="\n")
    kwargs = {
        "table": str(texts),
        "store_path": str(out),
        "model": {
            "source": str(prepared / m["source"]),
            "revision": m.get("revision"),
            "dtype": m["dtype"],
            "compatibility_mode": m["compatibility_mode"],
            "bos": m["bos"],
        },
        "activations": cfg["activations"],
        "batch_size": 1,
        "device": "cpu",
        "threads": 1,  # as the job gets (ONE_THREAD)
        "log": None,
    }
    code = (
        "import json, sys\nfrom layerscope.engine.store import cache_from_table\n"
        "cache_from_table(**json.loads(sys.argv[1]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(kwargs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def wait() -> Path:
        try:
            output, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert proc.returncode == 0, output
        return out

    yield wait
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture
def work(prepared, tmp_path):
    dest = tmp_path / "w"
    shutil.copytree(
        prepared, dest, symlinks=True
    )  # copy2 keeps mtimes: prompts.csv stays up to date
    return dest


# --------------------------------------------------------------------------------------------
# helpers


def _launch(work: Path, target: str) -> subprocess.Popen:
    log = open(work / "snakemake.out", "w")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "snakemake", "--cores", "1", *ONE_THREAD, target],
            cwd=work,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()


def _temps(work: Path) -> list[Path]:
    store = work / STORE
    pattern = temp_pattern(store)
    return sorted(p for p in store.parent.glob(".*.tmp") if pattern.fullmatch(p.name))


def _wait_for_partial(work: Path, proc: subprocess.Popen, timeout: float = 120) -> Path:
    """Wait until the caching job's temporary store exists and has grown past PARTIAL_BYTES."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"snakemake exited ({proc.returncode}) before the kill:\n{_out(work)}")
        assert not (work / STORE).exists(), (
            "the job finished before it could be killed; raise N_PROMPTS"
        )
        for tmp in _temps(work):
            with contextlib.suppress(FileNotFoundError):
                if tmp.stat().st_size > PARTIAL_BYTES:
                    return tmp
        time.sleep(0.05)
    pytest.fail(f"no partial store after {timeout} s:\n{_out(work)}")


def _job_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    """The python process(es) running the cache_activations script under this snakemake."""
    found = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmd = child.cmdline()
            if "python" in os.path.basename(cmd[0]) and any(
                a.endswith("cache_activations.py") for a in cmd
            ):
                found.append(child)
    return found


def _wait_dead(procs: list[psutil.Process], timeout: float = 30) -> bool:
    """True once none of ``procs`` runs any more (a zombie awaiting its parent counts as dead)."""

    def alive(p):
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout
    while any(alive(p) for p in procs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def _out(work: Path) -> str:
    path = work / "snakemake.out"
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def _assert_rejected(path: Path, tmp_dir: Path) -> None:
    """Every reader, and the extract_layer step, refuses ``path`` (named) and writes nothing."""
    rejected = re.escape(str(path)) + ": " + REJECTED
    with pytest.raises(LayerscopeError, match=rejected):
        h5cache.read_store_layer(path, 3)
    with pytest.raises(LayerscopeError, match=rejected):
        h5cache.copy_layer(path, 3, tmp_dir / "layer_3.h5", tmp_dir / "layer_3.tmp")
    try:
        f = h5py.File(path, "r")
    except OSError:
        pass  # not even HDF5: the readers above said so
    else:
        with f, pytest.raises(LayerscopeError, match=r"incomplete"):
            h5cache.check_file(f, path)
    out = tmp_dir / "extracted" / "layer_3.h5"
    with pytest.raises(LayerscopeError, match=rejected):
        extract_layer(path, 3, out)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def _assert_equal_stores(path: Path, ref: Path) -> None:
    """Complete, and every dataset equal (bit for bit) to the uninterrupted run's store."""
    with h5py.File(path, "r") as f, h5py.File(ref, "r") as r:
        attrs = h5cache.check_file(f, path, kind="store")
        assert attrs["complete"] is True
        names = []
        r.visititems(
            lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None
        )
        assert "resid_post/mean" in names and "resid_post/none/values" in names
        for name in names:
            assert np.array_equal(f[name][()], r[name][()]), name
        ref_attrs = h5cache.read_attrs(r)
        for key in (
            "n_prompts",
            "n_layers",
            "d_model",
            "components",
            "poolings",
            "token_level_layers",
        ):
            assert attrs[key] == ref_attrs[key], key


# --------------------------------------------------------------------------------------------
# tests


@pytest.mark.slow
def test_sigkilled_caching_job_leaves_nothing_accepted_and_rerun_redoes_it(
    work, reference, tmp_path
):
    proc = _launch(work, LAYER)
    try:
        tmp = _wait_for_partial(work, proc)
        jobs = _job_processes(proc)
        assert jobs, f"no cache_activations process found under snakemake:\n{_out(work)}"
        for job in jobs:
            job.send_signal(signal.SIGKILL)
        assert _wait_dead(jobs)
        # Snakemake notices the failed job and stops; if it does not, kill it too.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
    finally:
        _kill_group(proc)
    assert proc.returncode != 0
    assert "cache_activations" in _out(work) and "SIGKILL" in _out(work), _out(work)

    # (a) nothing at the final paths; only the temporary file, which no reader accepts
    assert not (work / STORE).exists() and not (work / LAYER).exists()
    assert _temps(work) == [tmp] and tmp.stat().st_size > PARTIAL_BYTES
    _assert_rejected(tmp, tmp_path)

    # (b) even copied into place at the final path, the partial file is refused
    shutil.copy(tmp, work / STORE)
    _assert_rejected(work / STORE, tmp_path)
    (work / STORE).unlink()

    # (c) the rerun redoes exactly the killed job and what the target needs from it ...
    dry = run_snakemake(work, "-n", "--rerun-incomplete", *ONE_THREAD, LAYER)
    assert job_counts(dry.stdout) == {"cache_activations": 1, "extract_layer": 1}, dry.stdout
    run_snakemake(work, "--rerun-incomplete", *ONE_THREAD, LAYER, timeout=300)
    # ... writes the same numbers as an uninterrupted run, and removes the stale temporary file
    _assert_equal_stores(work / STORE, reference())
    layer = h5cache.read_layer(work / LAYER)
    with h5py.File(reference()) as r:
        assert np.array_equal(layer.X, r["resid_post/mean"][3])
    assert _temps(work) == []


@pytest.mark.slow
def test_sigkilled_snakemake_resumes_with_unlock_and_rerun_incomplete(work, reference):
    proc = _launch(work, STORE)
    try:
        _wait_for_partial(work, proc)
        jobs = _job_processes(proc)
        assert jobs, _out(work)
    finally:
        _kill_group(proc)  # snakemake and its job together, as a lost node or `kill -9 -PGID` would
    assert proc.returncode == -signal.SIGKILL
    assert _wait_dead(jobs)  # the job went down with snakemake

    # Snakemake had marked the job's output incomplete and never got to clear the mark.
    marks = [base64.b64decode(p.name).decode() for p in (work / ".snakemake/incomplete").iterdir()]
    assert marks == [STORE]
    assert not (work / STORE).exists()
    # Its locks are left behind too: until `snakemake --unlock`, any run (--rerun-incomplete
    # included) stops with "LockException: Directory cannot be locked".
    assert list((work / ".snakemake/locks").iterdir())
    run_snakemake(work, "--unlock")
    run_snakemake(work, "--rerun-incomplete", *ONE_THREAD, STORE, timeout=300)

    _assert_equal_stores(work / STORE, reference())
    assert list((work / ".snakemake/incomplete").iterdir()) == []
    assert _temps(work) == []


def test_stale_temporary_files_are_removed_on_the_next_write(tmp_path):
    target = tmp_path / "store.h5"
    old = time.time() - 3600  # before this process started
    stale = tmp_path / ".store.h5.ab12_x9z.tmp"
    keep = {
        "fresh": tmp_path / ".store.h5.zz99yy88.tmp",  # written after this process started
        "other target": tmp_path / ".other.h5.ab12_x9z.tmp",
        "longer name": tmp_path / ".store.h5.foo.ab12_x9z.tmp",  # a temp of 'store.h5.foo'
        "not a temp name": tmp_path / ".store.h5.x.tmp",
        "no dot": tmp_path / "store.h5.ab12_x9z.tmp",
    }
    for path in [stale, *keep.values()]:
        path.write_text("partial")
        if path is not keep["fresh"]:
            os.utime(path, (old, old))

    with atomic_path(target) as tmp:
        assert temp_pattern(target).fullmatch(tmp.name)
        assert not stale.exists()
        # a second write of the same target by this process leaves the first one's file alone
        with atomic_path(target) as tmp2:
            assert tmp.exists()
            tmp2.write_text("inner")
        tmp.write_text("outer")
    assert target.read_text() == "outer"
    assert not tmp.exists() and not tmp2.exists()
    for what, path in keep.items():
        assert path.exists(), what

    # an explicit cutoff removes the fresh one as well; nothing else matches
    assert remove_stale_temps(target, older_than=time.time() + 1) == [keep["fresh"]]
    assert remove_stale_temps(tmp_path / "missing-dir" / "x.h5") == []
