import pandas as pd

from layerscope.jobs.scripting import job_logging
from layerscope.plotting import plots

with job_logging(snakemake.log[0]) as log:
    effects = pd.read_csv(snakemake.input.effects)
    written = plots.steering_dose_response(
        effects,
        snakemake.output.figure,
        model=snakemake.wildcards.model,
        experiment=snakemake.wildcards.steer,
        formats=snakemake.params.formats,
    )
    log.info("wrote %s", ", ".join(written))
