"""Atomic writes, error formatting and the script wrapper."""

import logging

import pytest

from layerscope.atomic import atomic_path, write_json
from layerscope.errors import ConfigError, InputError
from layerscope.jobs.scripting import job_logging


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "table.csv"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "x.json"
    write_json(target, {"b": 1, "a": [1, 2]})
    assert target.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_input_error_names_file_line_and_field():
    err = InputError(
        "value 'maybe' is not a boolean", file="data/scores.csv", line=4, field="is_faithful"
    )
    assert (
        str(err) == "data/scores.csv, line 4: field 'is_faithful': value 'maybe' is not a boolean"
    )
    assert str(InputError("empty file", file="a.jsonl")) == "a.jsonl: empty file"
    assert str(ConfigError("models.x.layers", "bad")) == "config key 'models.x.layers': bad"


def test_job_logging_turns_user_errors_into_exit_1(tmp_path, capsys):
    log = tmp_path / "logs" / "job.log"
    with pytest.raises(SystemExit) as exit_info:
        with job_logging(log, name="test-user-error"):
            raise InputError("bad label", file="f.csv", row=3, field="label")
    assert exit_info.value.code == 1
    text = log.read_text()
    assert "f.csv, row 3: field 'label': bad label" in text
    assert "Traceback" not in text


def test_job_logging_keeps_traceback_for_bugs(tmp_path):
    log = tmp_path / "job.log"
    with pytest.raises(ZeroDivisionError):
        with job_logging(log, name="test-bug"):
            1 / 0  # noqa: B018 (the bug under test)
    assert "Traceback" in log.read_text()
    assert not logging.getLogger("test-bug").handlers


def test_atomic_files_get_normal_permissions(tmp_path):
    import os

    target = tmp_path / "t.txt"
    write_json(target, {})
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
