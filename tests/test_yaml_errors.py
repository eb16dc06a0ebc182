"""Malformed YAML in a config names the file and the line (issue 13, item 5)."""

import subprocess
import sys

import pytest
from conftest import copy_workflow, run_snakemake

from layerscope.config import check_yaml_syntax
from layerscope.errors import InputError

BAD = {
    "misindented": ("models:\n  mine:\n    source: demo/model\n   layers: [1]\n", 4),
    "unclosed_list": ("models:\n  mine:\n    layers: [1, 2\ndatasets: {}\n", 4),
    "tab": ("models:\n  mine:\n\tsource: x\n", 3),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_yaml_error_names_file_and_line(tmp_path, name):
    text, line = BAD[name]
    path = tmp_path / "my.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        check_yaml_syntax(path)
    assert err.value.file == str(path) and err.value.line == line
    assert str(err.value).startswith(f"{path}, line {line}: invalid YAML")


def test_check_command_for_a_configfile(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text(BAD["misindented"][0])
    proc = subprocess.run(
        [sys.executable, "-m", "layerscope.config", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 1 and f"{path}, line 4: invalid YAML" in proc.stderr


@pytest.mark.slow
def test_bad_default_config_stops_snakemake_naming_file_and_line(tmp_path):
    work = copy_workflow(tmp_path)
    cfg = work / "config/config.yaml"
    lines = cfg.read_text().splitlines()
    lines.insert(5, "   oops: [1")  # line 6
    cfg.write_text("\n".join(lines) + "\n")
    proc = run_snakemake(work, "-n", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "config/config.yaml, line" in out and "invalid YAML" in out
    assert not (work / "results").exists()
