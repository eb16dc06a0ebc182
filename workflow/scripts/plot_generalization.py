from layerscope.jobs.scripting import job_logging
from layerscope.jobs.stages import generalization_figure

with job_logging(snakemake.log[0]) as log:
    layer = generalization_figure(
        snakemake.input[0],
        snakemake.output.figure,
        model=snakemake.wildcards.model,
        formats=snakemake.params.formats,
    )
    log.info("figure at layer %d (highest mean transfer)", layer)
