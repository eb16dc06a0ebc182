# Stage 3: linear probes per layer (a new layer trains only its own probes), then one summary table.


# Joins a few JSON files into one CSV: not worth a cluster job.
localrules:
    probe_summary,


rule train_probe:
    input:
        layer=rules.extract_layer.output[0],
        table=rules.prepare_dataset.output.table,
        summary=rules.prepare_dataset.output.summary,
    output:
        "results/probes/{model}/{dataset}/layer_{layer}.json",
    log:
        "logs/train_probe/{model}/{dataset}/layer_{layer}.log",
    benchmark:
        "benchmarks/train_probe/{model}/{dataset}/layer_{layer}.tsv"
    conda:
        "../../envs/core.yaml"
    threads: 1
    params:
        settings=PROBES.to_json(),
    script:
        "../scripts/train_probe.py"


rule probe_summary:
    input:
        lambda wc: per_layer(rules.train_probe.output[0], wc.model, wc.dataset),
    output:
        report(
            "results/probes/{model}/{dataset}/summary.csv",
            category="Probes",
            subcategory="{model}",
            caption="../report/probe_summary.rst",
            labels={"model": "{model}", "dataset": "{dataset}", "table": "probe summary"},
        ),
    log:
        "logs/probe_summary/{model}/{dataset}.log",
    conda:
        "../../envs/core.yaml"
    params:
        alpha=PROBES.alpha,
        n_permutations=PROBES.n_permutations,
    script:
        "../scripts/probe_summary.py"


rule activation_stats:
    input:
        layers=lambda wc: per_layer(rules.extract_layer.output[0], wc.model, wc.dataset),
        table=rules.prepare_dataset.output.table,
        summary=rules.prepare_dataset.output.summary,
    output:
        report(
            "results/stats/{model}/{dataset}/activation_stats.csv",
            category="Geometry",
            subcategory="{model}",
            caption="../report/activation_stats.rst",
            labels={"model": "{model}", "dataset": "{dataset}", "table": "activation statistics"},
        ),
    log:
        "logs/activation_stats/{model}/{dataset}.log",
    conda:
        "../../envs/core.yaml"
    script:
        "../scripts/activation_stats.py"


rule generalization:
    input:
        layers=lambda wc: [
            path
            for ds in GENERALIZATION[wc.group]
            for path in per_layer(rules.extract_layer.output[0], wc.model, ds)
        ],
        tables=lambda wc: expand(
            rules.prepare_dataset.output.table, dataset=GENERALIZATION[wc.group]
        ),
        summary=lambda wc: expand(
            rules.prepare_dataset.output.summary, dataset=GENERALIZATION[wc.group]
        ),
        # The diagonal is each dataset's probe summary, so the figure agrees with the probe curves.
        probes=lambda wc: expand(
            rules.probe_summary.output[0], model=wc.model, dataset=GENERALIZATION[wc.group]
        ),
    output:
        table="results/probes/{model}/generalization_{group}.csv",
    log:
        "logs/generalization/{model}/{group}.log",
    benchmark:
        "benchmarks/generalization/{model}/{group}.tsv"
    conda:
        "../../envs/core.yaml"
    params:
        datasets=lambda wc: GENERALIZATION[wc.group],
        layers=lambda wc: LAYERS[wc.model],
        settings=PROBES.to_json(),
        view=stable(FIGURE_VIEW),
    script:
        "../scripts/generalization.py"
