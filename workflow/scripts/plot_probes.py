from layerscope.jobs.scripting import job_logging
from layerscope.jobs.stages import probe_figure

with job_logging(snakemake.log[0]):
    probe_figure(
        snakemake.input[0],
        snakemake.output.figure,
        metric=snakemake.params.metric,
        model=snakemake.wildcards.model,
        dataset=snakemake.wildcards.dataset,
        n_layers=snakemake.params.n_layers,
        formats=snakemake.params.formats,
    )
