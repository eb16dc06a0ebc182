"""Mistakes that used to pass `snakemake -n` and fail at run time now stop the dry run, before any
job and before results/ exists (issue 13, item 6)."""

import pytest
import yaml
from conftest import copy_workflow, run_snakemake

pytestmark = pytest.mark.slow

MODEL = {"demo": {"source": "demo/model", "layers": [1]}}
FACTS = {
    "kind": "facts",
    "path": "demo/data/facts.csv",
    "filters": {"relation": "located_in"},
    "templates": {"located_in": "{subject} is located in {object}"},
}


def _labelled(work, rows):
    lines = ["text,label"] + [f"{t},{label}" for t, label in rows]
    (work / "mine.csv").write_text("\n".join(lines) + "\n")
    return {"kind": "labelled", "path": "mine.csv"}


def _case(work, case):
    cfg = {"models": dict(MODEL), "datasets": {"d": dict(FACTS)}}
    if case == "missing_model":
        cfg["models"] = {"demo": {"source": "demo/modle", "layers": [1]}}
        return cfg, ["models.demo.source", "demo/modle"]
    if case == "corrupt_model":
        weights = work / "demo/model/model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        return cfg, ["models.demo.source", "model.safetensors", "truncated"]
    if case == "template_typo":
        cfg["datasets"]["d"]["templates"] = {"located_in": "{subjet} is located in {object}"}
        return cfg, ["datasets.d.templates.located_in", "subjet"]
    if case == "single_class":
        cfg["datasets"]["d"] = _labelled(work, [(f"prompt {i}", "yes") for i in range(6)])
        return cfg, ["mine.csv", "field 'label'", "1 class"]
    if case == "prompt_too_long":
        long_text = " ".join(["seven"] * 300)
        cfg["datasets"]["d"] = _labelled(
            work, [("short a", "x"), ("short b", "x"), (long_text, "y"), ("c", "y")]
        )
        return cfg, ["datasets.d", "row_0002", "128-token context", "model 'demo'"]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["missing_model", "corrupt_model", "template_typo", "single_class", "prompt_too_long"]
)
def test_dry_run_stops_before_any_job(tmp_path, case):
    work = copy_workflow(tmp_path)
    cfg, words = _case(work, case)
    (work / "mine.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(work, "-n", "--configfile", "mine.yaml", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    for word in words:
        assert word in out, f"{word!r} not in:\n{out}"
    assert "Traceback" not in out
    assert not (work / "results").exists()
