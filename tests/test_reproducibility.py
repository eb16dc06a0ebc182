"""Two clean runs of the .test config give the same bytes: probe summaries, tables, figures,
arrays."""

import pytest
from conftest import copy_workflow, result_differences, run_snakemake

pytestmark = pytest.mark.slow


def test_two_clean_runs_are_identical(test_config_run, tmp_path):
    work = copy_workflow(tmp_path)
    run_snakemake(work, "--directory", ".test")
    first, second = test_config_run / "results", work / ".test" / "results"
    summaries = sorted(p.relative_to(first) for p in first.glob("probes/*/*/summary.csv"))
    assert len(summaries) == 2  # both datasets of the .test config
    for rel in summaries:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
    assert result_differences(first, second) == []
