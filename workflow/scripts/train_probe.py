from layerscope.jobs.probe_runs import positive_class, train_layer_probes
from layerscope.jobs.scripting import job_logging
from layerscope.settings import ProbeSettings

with job_logging(snakemake.log[0]) as log:
    train_layer_probes(
        snakemake.input.layer,
        snakemake.output[0],
        model=snakemake.wildcards.model,
        dataset=snakemake.wildcards.dataset,
        settings=ProbeSettings.of(snakemake.params.settings),
        positive=positive_class(snakemake.input.summary),
        log=log.info,
        table=snakemake.input.table,
    )
