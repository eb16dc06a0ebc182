from layerscope.jobs.probe_runs import summarize_probes
from layerscope.jobs.scripting import job_logging

with job_logging(snakemake.log[0]) as log:
    table = summarize_probes(snakemake.input, snakemake.output[0], alpha=snakemake.params.alpha)
    log.info("%d rows from %d probe files", len(table), len(snakemake.input))
