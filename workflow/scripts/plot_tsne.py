import json

from layerscope.jobs.scripting import job_logging
from layerscope.jobs.stages import tsne_figure

with job_logging(snakemake.log[0]):
    tsne_figure(
        list(snakemake.input.layers),
        snakemake.output.figure,
        model=snakemake.wildcards.model,
        dataset=snakemake.wildcards.dataset,
        formats=snakemake.params.formats,
        table=snakemake.input.table,
        **json.loads(snakemake.params.view),
    )
