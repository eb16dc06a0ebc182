import json

from layerscope.jobs.scripting import job_logging
from layerscope.jobs.stages import reliability_figure

with job_logging(snakemake.log[0]) as log:
    view = json.loads(snakemake.params.view)
    layer = reliability_figure(
        list(snakemake.input.probes),
        snakemake.input.summary,
        snakemake.output.figure,
        metric=view["metric"],
        component=view["component"],
        pooling=view["pooling"],
        model=snakemake.wildcards.model,
        dataset=snakemake.wildcards.dataset,
        formats=snakemake.params.formats,
    )
    log.info("reliability diagram at layer %d", layer)
