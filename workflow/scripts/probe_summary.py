from layerscope.jobs.probe_runs import holm_floor_warning, summarize_probes
from layerscope.jobs.scripting import job_logging

with job_logging(snakemake.log[0]) as log:
    alpha = snakemake.params.alpha
    table = summarize_probes(snakemake.input, snakemake.output[0], alpha=alpha)
    log.info("%d rows from %d probe files", len(table), len(snakemake.input))
    warning = holm_floor_warning(table, snakemake.params.n_permutations, alpha)
    if warning:
        log.warning("%s", warning)
