import json

from layerscope.jobs.probe_causal_run import causal_job
from layerscope.jobs.scripting import job_logging, log_visible_gpus
from layerscope.settings import ModelSettings, ProbeCausalSettings

with job_logging(snakemake.log[0]) as log:
    log_visible_gpus(log)
    files = {k: v for k, v in snakemake.input.items() if k != "model"}
    files["probes"] = list(files["probes"])
    # batch_size, device and engine are read here, not passed as params: float noise only, no rerun.
    runtime = ModelSettings.of(snakemake.config["models"][snakemake.wildcards.model])
    table = causal_job(
        files,
        snakemake.output[0],
        model=ModelSettings.of(snakemake.params.model),
        experiment=json.loads(snakemake.params.experiment),
        causal=ProbeCausalSettings.of(snakemake.params.causal),
        metric=snakemake.params.metric,
        device=runtime.device,
        batch_size=max(runtime.batch_size, 64),
        engine=runtime.engine,
        log=log.info,
    )
    for (layer, direction), verdict in (
        table.groupby(["layer", "direction"])["verdict"].first().items()
    ):
        log.info("layer %d %s: %s", layer, direction, verdict)
