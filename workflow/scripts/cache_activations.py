import json

from layerscope.activations import cache_from_table
from layerscope.scripting import job_logging, log_visible_gpus

with job_logging(snakemake.log[0]) as log:
    log_visible_gpus(log)
    shard = None
    if "shard" in snakemake.wildcards.keys():  # cache_shard: one part of the global batch plan
        shard = (int(snakemake.wildcards.shard), int(snakemake.wildcards.n_shards))
    # batch_size and device are read here, not passed as params, so that changing them does not rerun.
    runtime = snakemake.config["models"][snakemake.wildcards.model]
    cache_from_table(
        snakemake.input.table,
        snakemake.output[0],
        model=json.loads(snakemake.params.model),
        activations=json.loads(snakemake.params.activations),
        batch_size=runtime["batch_size"],
        device=runtime["device"],
        threads=snakemake.threads,
        log=log.info,
        shard=shard,
    )
