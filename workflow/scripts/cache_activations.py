import json

from layerscope.engine.activations import cache_from_table
from layerscope.jobs.scripting import job_logging, log_visible_gpus

with job_logging(snakemake.log[0]) as log:
    log_visible_gpus(log)
    shard = None
    if "shard" in snakemake.wildcards.keys():  # cache_shard: one part of the global batch plan
        shard = (int(snakemake.wildcards.shard), int(snakemake.wildcards.n_shards))
    # batch_size, max_tokens_per_batch, device, engine and self_check are read here, not passed as
    # params: they change results by float noise at most, so changing them must not rerun the job.
    runtime = snakemake.config["models"][snakemake.wildcards.model]
    cache_from_table(
        snakemake.input.table,
        snakemake.output[0],
        model=json.loads(snakemake.params.model),
        activations=json.loads(snakemake.params.activations),
        batch_size=runtime["batch_size"],
        max_tokens_per_batch=runtime.get("max_tokens_per_batch"),
        engine=runtime.get("engine", "auto"),
        self_check=runtime.get("self_check", 4),
        device=runtime["device"],
        threads=snakemake.threads,
        log=log.info,
        shard=shard,
    )
