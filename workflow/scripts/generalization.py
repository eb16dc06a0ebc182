import json
from pathlib import Path

from layerscope.jobs.probe_runs import positive_class
from layerscope.jobs.scripting import job_logging
from layerscope.jobs.stages import generalization
from layerscope.settings import ProbeSettings

with job_logging(snakemake.log[0]) as log:
    view = json.loads(snakemake.params.view)
    # Layer files live under results/activations/{model}/{dataset}/; group them by dataset.
    paths = {
        ds: [p for p in snakemake.input.layers if Path(p).parent.name == ds]
        for ds in snakemake.params.datasets
    }
    # ...their prompt tables under results/datasets/{dataset}/, their probe summaries under
    # results/probes/.
    tables = {Path(t).parent.name: t for t in snakemake.input.tables}
    summaries = {Path(t).parent.name: t for t in snakemake.input.probes}
    positives = {positive_class(p) for p in snakemake.input.summary}
    table = generalization(
        paths,
        snakemake.output.table,
        component=view["component"],
        pooling=view["pooling"],
        metric=view["metric"],
        model=snakemake.wildcards.model,
        group=snakemake.wildcards.group,
        positive=positives.pop() if len(positives) == 1 else None,
        settings=ProbeSettings.of(snakemake.params.settings),
        tables=tables,
        summaries=summaries,
    )
    log.info("%d cells", len(table))
