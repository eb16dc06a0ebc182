from layerscope.analysis import generalization_figure
from layerscope.scripting import job_logging

with job_logging(snakemake.log[0]) as log:
    layer = generalization_figure(
        snakemake.input[0], snakemake.output.figure, model=snakemake.wildcards.model,
        formats=snakemake.params.formats,
    )
    log.info("figure at layer %d (highest mean transfer)", layer)
