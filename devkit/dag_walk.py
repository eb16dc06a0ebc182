"""Every job of a workflow's full DAG with its inputs and params (for tests/test_staleness.py).

Run as ``python -m devkit.dag_walk WORKDIR [CONFIGFILE]``: it builds the DAG as ``snakemake
--forceall -n`` would (so every job of the config is listed, done or not) through Snakemake's API
and prints one JSON list of ``{"rule", "input", "params"}``. A subprocess, because Snakemake changes
the working directory and its logging while it runs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def dag_jobs(workdir: str | os.PathLike, configfile: str | None = None) -> list[dict]:
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        DAGSettings,
        OutputSettings,
        ResourceSettings,
        StorageSettings,
    )

    workdir = Path(workdir).resolve()
    config = ConfigSettings(configfiles=[workdir / configfile] if configfile else [])
    with SnakemakeApi(OutputSettings(dryrun=True)) as api:
        wf_api = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=config,
            storage_settings=StorageSettings(),
            snakefile=workdir / "Snakefile",
            workdir=workdir,
        )
        dag_api = wf_api.dag(DAGSettings(forceall=True))
        # No public call returns the job list; summary() builds the same DAG these two calls do.
        workflow = dag_api.workflow_api._workflow
        workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True)
        workflow._build_dag()
        return [
            {
                "rule": job.rule.name,
                "input": sorted(str(f) for f in job.input),
                "params": {k: v for k, v in job.params.items()},
            }
            for job in workflow.dag.jobs
        ]


if __name__ == "__main__":
    jobs = dag_jobs(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
    print("DAG-JOBS " + json.dumps(jobs, default=str))
