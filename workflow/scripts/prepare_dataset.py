import json

from layerscope.data.datasets import build_prompt_table, write_prompt_table
from layerscope.jobs.scripting import job_logging

with job_logging(snakemake.log[0]) as log:
    table, summary = build_prompt_table(
        snakemake.wildcards.dataset, json.loads(snakemake.params.spec), min_classes=2
    )
    write_prompt_table(table, summary, snakemake.output.table, snakemake.output.summary)
    log.info(
        "%s: %d prompts, classes %s", snakemake.wildcards.dataset, len(table), summary["counts"]
    )
