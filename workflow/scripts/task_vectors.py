import json

from layerscope.analysis import task_vector_analysis
from layerscope.scripting import job_logging

with job_logging(snakemake.log[0]) as log:
    settings = json.loads(snakemake.params.settings)
    figures = {k: v for k, v in snakemake.output.items() if k != "extra"}
    info = task_vector_analysis(
        list(snakemake.input.layers),
        figures,
        component=settings["component"],
        pooling=settings["pooling"],
        n_boot=settings["n_boot"],
        seed=settings["seed"],
        layer=settings["layer"],
        model=snakemake.wildcards.model,
        dataset=snakemake.wildcards.dataset,
        formats=snakemake.params.formats,
        table=snakemake.input.table,
    )
    log.info("best separation at layer %d (heatmap also at layer %d)", info["best_layer"], info["chosen_layer"])
