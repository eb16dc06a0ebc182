import json

from layerscope.jobs.scripting import job_logging
from layerscope.jobs.stages import depth_comparison

with job_logging(snakemake.log[0]):
    view = json.loads(snakemake.params.view)
    depth_comparison(
        dict(zip(snakemake.params.models, snakemake.input)),
        snakemake.params.n_layers,
        snakemake.output.figure,
        dataset=snakemake.wildcards.dataset,
        formats=snakemake.params.formats,
        **view,
    )
