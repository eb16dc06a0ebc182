from layerscope.jobs.scripting import job_logging
from layerscope.jobs.stages import task_vector_scores
from layerscope.settings import TaskVectorSettings

with job_logging(snakemake.log[0]) as log:
    settings = TaskVectorSettings.of(snakemake.params.settings)
    scores = task_vector_scores(
        list(snakemake.input.layers),
        snakemake.output.scores,
        snakemake.output.matrices,
        component=settings.component,
        pooling=settings.pooling,
        n_boot=settings.n_boot,
        seed=settings.seed,
        model=snakemake.wildcards.model,
        dataset=snakemake.wildcards.dataset,
        table=snakemake.input.table,
    )
    log.info("task-vector scores of %d layers", len(scores))
