from layerscope.jobs.scripting import job_logging
from layerscope.jobs.stages import task_vector_figures

with job_logging(snakemake.log[0]) as log:
    figures = {k: v for k, v in snakemake.output.items() if k != "extra"}
    info = task_vector_figures(
        snakemake.input.scores,
        snakemake.input.matrices,
        figures,
        layer=snakemake.params.layer,
        model=snakemake.wildcards.model,
        dataset=snakemake.wildcards.dataset,
        formats=snakemake.params.formats,
    )
    log.info(
        "best separation at layer %d (heatmap also at layer %d)",
        info["best_layer"],
        info["chosen_layer"],
    )
