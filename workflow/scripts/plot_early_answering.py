import pandas as pd

from layerscope.jobs.scripting import job_logging
from layerscope.plotting import cot

with job_logging(snakemake.log[0]) as log:
    model, dataset = snakemake.wildcards.model, snakemake.wildcards.dataset
    written = cot.early_answering(
        pd.read_csv(snakemake.input.summary),
        snakemake.output.figure,
        title=f"{model} / {dataset}: early answering",
        formats=snakemake.params.formats,
    )
    log.info("wrote %s", ", ".join(written))
