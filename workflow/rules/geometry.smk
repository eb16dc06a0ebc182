# Stage 5: task-vector geometry of task-grid datasets, and activation patching experiments.


rule task_vectors:
    input:
        layers=lambda wc: per_layer("results/activations/{model}/{dataset}/layer_{layer}.h5", wc.model, wc.dataset),
        table="results/datasets/{dataset}/prompts.csv",
    output:
        scores=report(
            "results/task_vectors/{model}/{dataset}/scores.csv",
            category="Task vectors",
            subcategory="{model}",
            caption="../report/task_vector_scores.rst",
            labels={"model": "{model}", "dataset": "{dataset}", "table": "task-vector scores"},
        ),
        matrices="results/task_vectors/{model}/{dataset}/matrices.h5",
        **{
            name: report(
                f"results/figures/{{model}}/{{dataset}}/task_{name}.png",
                category="Task vectors",
                subcategory="{model}",
                caption=f"../report/task_{name}.rst",
                labels={"model": "{model}", "dataset": "{dataset}", "figure": f"task {name.replace('_', ' ')}"},
            )
            for name in TASK_VECTOR_FIGURES
        },
        extra=[
            path
            for name in TASK_VECTOR_FIGURES
            for path in extra_formats(f"results/figures/{{model}}/{{dataset}}/task_{name}")
        ],
    params:
        settings=lambda wc: stable(task_vector_settings(wc.model)),
        formats=config["figures"]["formats"],
    log:
        "logs/task_vectors/{model}/{dataset}.log",
    conda:
        "../../envs/core.yaml"
    script:
        "../scripts/task_vectors.py"


rule patching:
    input:
        pairs=lambda wc: config["patching"]["experiments"][wc.experiment]["pairs"],
        model=lambda wc: model_files(model_cfg(wc)["source"]),
    output:
        cells="results/patching/{model}/{experiment}/cells.csv",
        arrays="results/patching/{model}/{experiment}/arrays.h5",
        summary=report(
            "results/patching/{model}/{experiment}/summary.csv",
            category="Patching",
            subcategory="{model}",
            caption="../report/patching_summary.rst",
            labels={"model": "{model}", "experiment": "{experiment}", "table": "patching summary"},
        ),
        heatmaps=report(
            "results/figures/{model}/patching_{experiment}.png",
            category="Patching",
            subcategory="{model}",
            caption="../report/patching_heatmaps.rst",
            labels={"model": "{model}", "experiment": "{experiment}", "figure": "patching heatmaps"},
        ),
        **(
            {
                "heads": report(
                    "results/figures/{model}/patching_{experiment}_heads.png",
                    category="Patching",
                    subcategory="{model}",
                    caption="../report/patching_heads.rst",
                    labels={"model": "{model}", "experiment": "{experiment}", "figure": "patching heads"},
                )
            }
            if config["patching"]["heads"]
            else {}
        ),
        extra=extra_formats("results/figures/{model}/patching_{experiment}")
        + (extra_formats("results/figures/{model}/patching_{experiment}_heads") if config["patching"]["heads"] else []),
    params:
        model=lambda wc: stable(model_identity(wc.model)),
        settings=lambda wc: stable(patching_settings(wc.model)),
        formats=config["figures"]["formats"],
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    threads: 2
    log:
        "logs/patching/{model}/{experiment}.log",
    benchmark:
        "benchmarks/patching/{model}/{experiment}.tsv"
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/patching.py"
