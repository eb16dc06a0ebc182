from layerscope.engine.store import extract_layer
from layerscope.jobs.scripting import job_logging

with job_logging(snakemake.log[0]) as log:
    extract_layer(
        snakemake.input.store,
        int(snakemake.wildcards.layer),
        snakemake.output[0],
        table=snakemake.input.table,
    )
    log.info("wrote %s", snakemake.output[0])
