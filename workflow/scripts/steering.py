import json

from layerscope.jobs.scripting import job_logging, log_visible_gpus
from layerscope.jobs.steering_run import by_layer, steering_experiment
from layerscope.settings import ModelSettings, PrecisionSettings

with job_logging(snakemake.log[0]) as log:
    log_visible_gpus(log)
    experiment = json.loads(snakemake.params.experiment)
    files = {k: v for k, v in snakemake.input.items() if k != "model"}
    for key in ("probes", "layers"):
        if key in files:
            files[key] = by_layer(list(files[key]), experiment["layers"])
    # batch_size, device and engine are read here, not passed as params: float noise only, no rerun.
    runtime = ModelSettings.of(snakemake.config["models"][snakemake.wildcards.model])
    summary = steering_experiment(
        files,
        {k: v for k, v in snakemake.output.items()},
        model=ModelSettings.of(snakemake.params.model),
        experiment=experiment,
        precision=PrecisionSettings.of(snakemake.params.precision),
        device=runtime.device,
        batch_size=max(runtime.batch_size, 64),
        threads=snakemake.threads,
        engine=runtime.engine,
        name=snakemake.wildcards.steer,
        log=log.info,
    )
    for h in summary["headline"]:
        log.info(
            "strongest %s: layer %d alpha %g -> %.3f [%.3f, %.3f] (n=%d), "
            "beyond the random band: %s",
            *(
                h[k]
                for k in (
                    "metric",
                    "layer",
                    "alpha",
                    "value",
                    "ci_low",
                    "ci_high",
                    "n",
                    "beyond_random",
                )
            ),
        )
