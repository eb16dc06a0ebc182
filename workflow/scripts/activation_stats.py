from layerscope.jobs.probe_runs import positive_class
from layerscope.jobs.scripting import job_logging
from layerscope.jobs.stages import activation_stats_table

with job_logging(snakemake.log[0]) as log:
    table = activation_stats_table(
        list(snakemake.input.layers),
        snakemake.output[0],
        positive=positive_class(snakemake.input.summary),
        table=snakemake.input.table,
    )
    log.info("%d rows", len(table))
