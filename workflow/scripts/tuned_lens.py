import json

from layerscope.jobs.cot_run import tuned_lens_job
from layerscope.jobs.scripting import job_logging, log_visible_gpus
from layerscope.settings import CotSettings, ModelSettings

with job_logging(snakemake.log[0]) as log:
    log_visible_gpus(log)
    # batch_size, device and engine are read here, not passed as params: float noise only, no rerun.
    runtime = ModelSettings.of(snakemake.config["models"][snakemake.wildcards.model])
    tuned_lens_job(
        snakemake.input.table,
        snakemake.output[0],
        model=ModelSettings.of(snakemake.params.model),
        cot=CotSettings.of(json.loads(snakemake.params.cot)),
        dataset=snakemake.wildcards.dataset,
        device=runtime.device,
        batch_size=runtime.batch_size,
        engine=runtime.engine,
        log=log.info,
    )
