import json

from layerscope.jobs.cot_run import early_answering_job
from layerscope.jobs.scripting import job_logging, log_visible_gpus
from layerscope.settings import CotSettings, ModelSettings, PrecisionSettings

with job_logging(snakemake.log[0]) as log:
    log_visible_gpus(log)
    # batch_size, device and engine are read here, not passed as params: float noise only, no rerun.
    runtime = ModelSettings.of(snakemake.config["models"][snakemake.wildcards.model])
    early_answering_job(
        snakemake.input.table,
        dict(snakemake.output.items()),
        model=ModelSettings.of(snakemake.params.model),
        cot=CotSettings.of({"early_answering": json.loads(snakemake.params.early)}),
        precision=PrecisionSettings.of(snakemake.params.precision),
        dataset=snakemake.wildcards.dataset,
        marker=snakemake.params.marker,
        device=runtime.device,
        batch_size=max(runtime.batch_size, 64),
        engine=runtime.engine,
        threads=snakemake.threads,
        log=log.info,
    )
