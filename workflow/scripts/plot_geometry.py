import json

from layerscope.jobs.scripting import job_logging
from layerscope.jobs.stages import geometry_figures

with job_logging(snakemake.log[0]) as log:
    view = json.loads(snakemake.params.view)
    figures = {name: path for name, path in snakemake.output.items() if name != "extra"}
    info = geometry_figures(
        list(snakemake.input.layers),
        snakemake.input.summary,
        figures,
        model=snakemake.wildcards.model,
        dataset=snakemake.wildcards.dataset,
        formats=snakemake.params.formats,
        table=snakemake.input.table,
        **view,
    )
    log.info("best layer by %s: %d", view["metric"], info["best_layer"])
