import json

import pandas as pd

from layerscope.jobs.scripting import job_logging
from layerscope.plotting import attribution as pa
from layerscope.plotting.plots import save_figure

with job_logging(snakemake.log[0]) as log:
    names = {"model": snakemake.wildcards.model, "experiment": snakemake.wildcards.atp_experiment}
    table = pd.read_csv(
        snakemake.input.table, keep_default_na=False, na_values=[""], dtype={"token": str}
    )
    with open(snakemake.input.summary) as fh:
        summary = json.load(fh)
    figures = {
        "heatmaps": pa.draw_attribution_heatmaps(table, **names),
        "scatter": pa.draw_attribution_scatter(table, summary, **names),
    }
    if "heads" in snakemake.output.keys():
        figures["heads"] = pa.draw_attribution_heads(table, **names)
    for key, fig in figures.items():
        for path in save_figure(
            fig, snakemake.output[key], snakemake.params.formats, dpi=150, tight=True
        ):
            log.info("wrote %s", path)
        fig.clear()
