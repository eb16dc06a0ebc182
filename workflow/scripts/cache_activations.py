from layerscope.engine.store import cache_from_table
from layerscope.jobs.scripting import job_logging, log_visible_gpus
from layerscope.settings import ActivationSettings, ModelSettings

with job_logging(snakemake.log[0]) as log:
    log_visible_gpus(log)
    shard = None
    if "shard" in snakemake.wildcards.keys():  # cache_shard: one part of the global batch plan
        shard = (int(snakemake.wildcards.shard), int(snakemake.wildcards.n_shards))
    # batch_size, max_tokens_per_batch, device, engine and self_check are read here, not passed as
    # params: they change results by float noise at most, so changing them must not rerun the job.
    runtime = ModelSettings.of(snakemake.config["models"][snakemake.wildcards.model])
    cache_from_table(
        snakemake.input.table,
        snakemake.output[0],
        model=ModelSettings.of(snakemake.params.model),
        activations=ActivationSettings.of(snakemake.params.activations),
        batch_size=runtime.batch_size,
        max_tokens_per_batch=runtime.max_tokens_per_batch,
        engine=runtime.engine,
        self_check=runtime.self_check,
        device=runtime.device,
        threads=snakemake.threads,
        log=log.info,
        shard=shard,
    )
