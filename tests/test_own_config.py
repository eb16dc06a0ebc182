"""A user's own config stands on its own (issue 13, item 1): with --configfile only what it declares
runs."""

import pytest
import yaml
from conftest import copy_workflow, job_counts, run_snakemake

pytestmark = pytest.mark.slow

ONE_MODEL_ONE_DATASET = {
    "models": {"mine": {"source": "demo/model", "layers": [1, 2]}},
    "datasets": {
        "my_facts": {
            "kind": "facts",
            "path": "demo/data/facts.csv",
            "filters": {"relation": "located_in"},
            "templates": {"located_in": "{subject} is located in {object}"},
        }
    },
}


def test_own_config_schedules_only_its_model_and_dataset(tmp_path):
    work = copy_workflow(tmp_path)
    (work / "mine.yaml").write_text(yaml.safe_dump(ONE_MODEL_ONE_DATASET))
    proc = run_snakemake(work, "-n", "--configfile", "mine.yaml")
    counts = job_counts(proc.stdout)
    assert counts["prepare_dataset"] == 1
    assert counts["cache_activations"] == 1
    assert counts["extract_layer"] == 2 and counts["train_probe"] == 2
    # Nothing of the demo config: no demo model, no demo dataset, no task vectors or patching.
    for absent in ("patching", "task_vectors", "generalization"):
        assert absent not in counts
    out = proc.stdout
    assert "model=mine" in out and "dataset=my_facts" in out
    for demo_name in ("model=demo", "numbers_phase2", "facts_capital_of", "dataset=tasks"):
        assert demo_name not in out


def test_target_before_configfile_is_the_working_form(tmp_path):
    """`snakemake TARGET --configfile x.yaml` and `--configfile x.yaml -- TARGET` both build
    TARGET."""
    work = copy_workflow(tmp_path)
    (work / "mine.yaml").write_text(yaml.safe_dump(ONE_MODEL_ONE_DATASET))
    target = "results/datasets/my_facts/prompts.csv"
    for args in (
        (target, "--configfile", "mine.yaml"),
        ("--configfile", "mine.yaml", "--", target),
    ):
        assert job_counts(run_snakemake(work, "-n", *args).stdout) == {"prepare_dataset": 1}


def test_without_configfile_the_demo_config_runs(tmp_path):
    work = copy_workflow(tmp_path)
    out = run_snakemake(work, "-n").stdout
    assert "model=demo" in out and "dataset=numbers_phase2" in out
