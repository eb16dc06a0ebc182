# Stage 1: every dataset kind -> one normalized prompt table.


# Seconds of pandas: not worth a cluster job.
localrules:
    prepare_dataset,


rule prepare_dataset:
    input:
        lambda wc: dataset_files(dataset_spec(wc)),
    output:
        table=report(
            "results/datasets/{dataset}/prompts.csv",
            category="Datasets",
            caption="../report/dataset.rst",
            labels={"dataset": "{dataset}", "table": "prompt table"},
        ),
        summary="results/datasets/{dataset}/summary.json",
    log:
        "logs/prepare_dataset/{dataset}.log",
    conda:
        "../../envs/core.yaml"
    params:
        spec=lambda wc: stable(dataset_spec(wc)),
    script:
        "../scripts/prepare_dataset.py"
