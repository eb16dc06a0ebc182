import pandas as pd

from layerscope.jobs.scripting import job_logging
from layerscope.plotting import cot

with job_logging(snakemake.log[0]) as log:
    model, dataset = snakemake.wildcards.model, snakemake.wildcards.dataset
    written = cot.lens_heatmap(
        pd.read_csv(snakemake.input.lens_summary),
        snakemake.output.heatmap,
        title=f"{model} / {dataset}: answer log-prob along the chain of thought",
        formats=snakemake.params.formats,
    )
    written += cot.lead_time(
        pd.read_csv(snakemake.input.lead_time),
        pd.read_csv(snakemake.input.lead_summary),
        snakemake.output.lead,
        title=f"{model} / {dataset}: lead time of the answer",
        formats=snakemake.params.formats,
    )
    log.info("wrote %s", ", ".join(written))
