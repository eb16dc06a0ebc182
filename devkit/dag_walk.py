"""Every job of a workflow's full DAG with its inputs and params (for tests/test_staleness.py).

Run as ``python -m devkit.dag_walk ROOT [CONFIGFILE] [--directory DIR]``: it builds the DAG as
``snakemake --forceall -n`` would (so every job of the config is listed, done or not) through
Snakemake's API and prints one JSON list of ``{"rule", "input", "params"}``. A subprocess, because
Snakemake changes the working directory and its logging while it runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def dag_jobs(
    root: str | os.PathLike, configfile: str | None = None, directory: str | None = None
) -> list[dict]:
    """Jobs of the workflow in ``root`` (its Snakefile) run in ``root/directory`` (--directory)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        DAGSettings,
        OutputSettings,
        ResourceSettings,
        StorageSettings,
    )

    root = Path(root).resolve()
    workdir = root / directory if directory else root
    config = ConfigSettings(configfiles=[workdir / configfile] if configfile else [])
    with SnakemakeApi(OutputSettings(dryrun=True)) as api:
        wf_api = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=config,
            storage_settings=StorageSettings(),
            snakefile=root / "Snakefile",
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
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("configfile", nargs="?")
    parser.add_argument("--directory")
    args = parser.parse_args()
    jobs = dag_jobs(args.root, args.configfile, args.directory)
    print("DAG-JOBS " + json.dumps(jobs, default=str))
