from layerscope.jobs.attribution_run import attribution_experiment
from layerscope.jobs.scripting import job_logging, log_visible_gpus
from layerscope.settings import ModelSettings, PatchingSettings

with job_logging(snakemake.log[0]) as log:
    log_visible_gpus(log)
    # batch_size, device and engine are read here, not passed as params, so that changing them does
    # not rerun.
    runtime = ModelSettings.of(snakemake.config["models"][snakemake.wildcards.model])
    # params.settings carries the experiment's own method (common.smk: attribution_settings).
    settings = PatchingSettings.of(snakemake.params.settings)
    info = attribution_experiment(
        snakemake.input.pairs,
        dict(snakemake.output.items()),
        model=ModelSettings.of(snakemake.params.model),
        settings=settings,
        method=settings.method,
        device=runtime.device,
        batch_size=max(runtime.batch_size, 64),
        engine=runtime.engine,
        threads=snakemake.threads,
        log=log.info,
    )
    log.info("%d pairs; %s", info["n_pairs"], "; ".join(info["notes"]) or "no notes")
