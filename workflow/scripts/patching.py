from layerscope.jobs.scripting import job_logging, log_visible_gpus
from layerscope.jobs.stages import patching_experiment
from layerscope.settings import ModelSettings, PatchingSettings, PrecisionSettings

with job_logging(snakemake.log[0]) as log:
    log_visible_gpus(log)
    # batch_size, device and engine are read here, not passed as params, so that changing them does
    # not rerun.
    runtime = ModelSettings.of(snakemake.config["models"][snakemake.wildcards.model])
    info = patching_experiment(
        snakemake.input.pairs,
        dict(snakemake.output.items()),
        model=ModelSettings.of(snakemake.params.model),
        settings=PatchingSettings.of(snakemake.params.settings),
        precision=PrecisionSettings.of(snakemake.params.precision),
        experiment=snakemake.wildcards.experiment,
        model_name=snakemake.wildcards.model,
        device=runtime.device,
        batch_size=max(runtime.batch_size, 64),
        engine=runtime.engine,
        threads=snakemake.threads,
        log=log.info,
    )
    log.info(
        "%d pairs; notes: %s; warnings: %s",
        info["n_pairs"],
        "; ".join(info["notes"]) or "none",
        "; ".join(info["warnings"]) or "none",
    )
