"""Failures that are the user's to fix, not bugs (issue 13, item 4): a truncated or corrupt weights
file
and a full disk get a message naming the file and saying what to do; the disk margin is
proportional."""

import errno
import shutil
import sys
import types
from pathlib import Path

import pytest

from layerscope.atomic import write_json
from layerscope.config import safetensors_problem, validate_config
from layerscope.errors import ConfigError, environment_error
from layerscope.jobs.scripting import job_logging

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow/schemas/config.schema.yaml"


def _model_copy(tmp_path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(REPO / "demo/model", dest)
    return dest


def _config(source):
    return {
        "models": {"m": {"source": source}},
        "datasets": {
            "t": {"kind": "task_grid", "tasks": ["sum", "product"], "pairs": [[1, 2], [3, 4]]}
        },
    }


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_weights_are_caught_before_any_job(tmp_path):
    model = _model_copy(tmp_path)
    assert safetensors_problem(model / "model.safetensors") is None
    _truncate(model / "model.safetensors")
    with pytest.raises(ConfigError) as err:
        validate_config(_config("model"), SCHEMA, base_dir=tmp_path)
    msg = str(err.value)
    assert "models.m.source" in msg and "model.safetensors" in msg and "truncated" in msg
    assert "download the model again" in msg


@pytest.mark.parametrize("damage", ["garbage_header", "tiny", "no_weights", "bad_config_json"])
def test_corrupt_model_directories_name_the_file(tmp_path, damage):
    model = _model_copy(tmp_path)
    weights = model / "model.safetensors"
    if damage == "garbage_header":
        data = bytearray(weights.read_bytes())
        data[8:40] = b"\x00" * 32
        weights.write_bytes(bytes(data))
    elif damage == "tiny":
        weights.write_bytes(b"\x01\x02")
    elif damage == "no_weights":
        weights.unlink()
    else:
        (model / "config.json").write_text("{not json")
    with pytest.raises(ConfigError) as err:
        validate_config(_config("model"), SCHEMA, base_dir=tmp_path)
    named = "config.json" if damage == "bad_config_json" else "safetensors"
    assert named in str(err.value)


@pytest.fixture
def fake_job(monkeypatch, tmp_path):
    """A Snakemake script's view: the job's ``snakemake`` object in ``__main__``."""
    job = types.SimpleNamespace(
        input=[str(tmp_path / "model/model.safetensors")],
        output=[str(tmp_path / "probes/layer_3.json")],
    )
    monkeypatch.setattr(sys.modules["__main__"], "snakemake", job, raising=False)
    return job


def test_safetensors_error_at_run_time_names_the_file(tmp_path, fake_job, capsys):
    from safetensors.torch import load_file

    model = _model_copy(tmp_path)
    _truncate(model / "model.safetensors", keep=0.3)
    log = tmp_path / "job.log"
    with pytest.raises(SystemExit) as exit_:
        with job_logging(log):
            load_file(model / "model.safetensors")
    assert exit_.value.code == 1
    text = log.read_text()
    assert (
        "model/model.safetensors" in text and "truncated or corrupt" in text and "download" in text
    )
    assert "a bug in layerscope" not in text and "Traceback" not in text


def test_full_disk_while_writing_probe_results(tmp_path, fake_job, monkeypatch):
    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    out = Path(fake_job.output[0])
    out.parent.mkdir(parents=True)
    monkeypatch.setattr(Path, "write_text", no_space)
    log = tmp_path / "job.log"
    with pytest.raises(SystemExit) as exit_:
        with job_logging(log):
            write_json(out, {"auroc": 0.9})
    monkeypatch.undo()
    assert exit_.value.code == 1
    text = log.read_text()
    assert f"no space left on the device while writing {out}" in text and "free some space" in text
    assert "a bug in layerscope" not in text
    assert list(out.parent.iterdir()) == []  # neither the output nor its temporary file


def test_h5py_style_disk_full_and_other_errors():
    h5_style = OSError(
        "Can't write data (file write failed: errno = 28, "
        "error message = 'No space left on device')"
    )
    assert "no space left" in str(environment_error(h5_style, outputs=["a.h5"]))
    assert environment_error(ValueError("x")) is None
    assert environment_error(OSError(errno.EACCES, "denied")) is None
