import json

import pandas as pd

from layerscope.jobs.scripting import job_logging
from layerscope.plotting import plots

with job_logging(snakemake.log[0]) as log:
    effects = pd.read_csv(snakemake.input.effects)
    with open(snakemake.input.summary, encoding="utf-8") as f:
        warnings = json.load(f).get("warnings", [])
    written = plots.steering_dose_response(
        effects,
        snakemake.output.figure,
        model=snakemake.wildcards.model,
        experiment=snakemake.wildcards.steer,
        formats=snakemake.params.formats,
        warnings=warnings,
    )
    log.info("wrote %s", ", ".join(written))
