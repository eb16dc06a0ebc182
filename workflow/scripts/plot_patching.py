import json

import pandas as pd

from layerscope.jobs.scripting import job_logging
from layerscope.plotting import patching as pp
from layerscope.plotting.plots import save_figure

with job_logging(snakemake.log[0]) as log:
    formats = snakemake.params.formats
    names = {"model": snakemake.wildcards.model, "experiment": snakemake.wildcards.experiment}
    labels, pairs = pp.read_position_labels(snakemake.input.arrays)
    summary = pd.read_csv(
        snakemake.input.summary, keep_default_na=False, na_values=[""], dtype={"token": str}
    )
    with open(snakemake.input.run, encoding="utf-8") as f:
        names["warnings"] = json.load(f).get("warnings", [])
    figures = {"heatmaps": pp.draw_patching_heatmaps(summary, labels, pairs=pairs, **names)}
    if "heads" in snakemake.output.keys():
        figures["heads"] = pp.draw_head_heatmap(
            summary, model=names["model"], experiment=names["experiment"]
        )
    if "generation" in snakemake.output.keys():
        gen = pd.read_csv(snakemake.input.generation_summary, dtype={"position": str})
        figures["generation"] = pp.draw_generation_heatmap(gen, labels, **names)
    for key, fig in figures.items():
        for path in save_figure(fig, snakemake.output[key], formats, dpi=150, tight=True):
            log.info("wrote %s", path)
        fig.clear()
