import json

from layerscope.jobs.probe_causal_run import probe_card
from layerscope.jobs.scripting import job_logging

with job_logging(snakemake.log[0]) as log:
    view = json.loads(snakemake.params.view)
    card = probe_card(
        snakemake.input.summary,
        list(snakemake.input.causal),
        snakemake.output[0],
        model=snakemake.wildcards.model,
        dataset=snakemake.wildcards.dataset,
        metric=view["metric"],
    )
    log.info("probe card: %d rows (view x family at each view's best layer)", len(card))
