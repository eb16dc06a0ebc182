from layerscope.engine.store import gather_store
from layerscope.jobs.scripting import job_logging

with job_logging(snakemake.log[0]) as log:
    gather_store(list(snakemake.input), snakemake.output.store, log=log.info)
