import json

from layerscope.activations import cache_from_table
from layerscope.scripting import job_logging

with job_logging(snakemake.log[0]) as log:
    model = json.loads(snakemake.params.model)
    # batch_size and device are read here, not passed as params, so that changing them does not rerun.
    runtime = snakemake.config["models"][snakemake.wildcards.model]
    cache_from_table(
        snakemake.input.table,
        snakemake.output.store,
        model=model,
        activations=json.loads(snakemake.params.activations),
        batch_size=runtime["batch_size"],
        device=runtime["device"],
        threads=snakemake.threads,
        log=log.info,
    )
