from layerscope.jobs.cot_run import trajectories_job
from layerscope.jobs.scripting import job_logging, log_visible_gpus
from layerscope.settings import CotSettings, ModelSettings

with job_logging(snakemake.log[0]) as log:
    log_visible_gpus(log)
    # batch_size, device and engine are read here, not passed as params: float noise only, no rerun.
    runtime = ModelSettings.of(snakemake.config["models"][snakemake.wildcards.model])
    cot = CotSettings.of(snakemake.params.cot)
    files = {
        "table": snakemake.input.table,
        "probes": list(zip(snakemake.input.probes, cot.probes)),
    }
    trajectories_job(
        files,
        dict(snakemake.output.items()),
        model=ModelSettings.of(snakemake.params.model),
        cot=cot,
        dataset=snakemake.wildcards.dataset,
        device=runtime.device,
        batch_size=runtime.batch_size,
        engine=runtime.engine,
        threads=snakemake.threads,
        log=log.info,
    )
