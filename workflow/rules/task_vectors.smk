# Stage 5a: task-vector geometry of task-grid datasets. The compute job writes tables and arrays; a
# separate plot job draws from them, so a figure setting (formats, the heatmap layer) never reruns
# the bootstrap.


rule task_vectors:
    input:
        layers=lambda wc: per_layer(rules.extract_layer.output[0], wc.model, wc.dataset),
        table=rules.prepare_dataset.output.table,
    output:
        scores=report(
            "results/task_vectors/{model}/{dataset}/scores.csv",
            category="Task vectors",
            subcategory="{model}",
            caption="../report/task_vector_scores.rst",
            labels={"model": "{model}", "dataset": "{dataset}", "table": "task-vector scores"},
        ),
        matrices="results/task_vectors/{model}/{dataset}/matrices.h5",
    log:
        "logs/task_vectors/{model}/{dataset}.log",
    benchmark:
        "benchmarks/task_vectors/{model}/{dataset}.tsv"
    conda:
        "../../envs/core.yaml"
    params:
        settings=lambda wc: stable(task_vector_compute_settings(wc.model)),
    script:
        "../scripts/task_vectors.py"


rule plot_task_vectors:
    input:
        scores=rules.task_vectors.output.scores,
        matrices=rules.task_vectors.output.matrices,
    output:
        **{
            name: report(
                f"results/figures/{{model}}/{{dataset}}/task_{name}.png",
                category="Task vectors",
                subcategory="{model}",
                caption=f"../report/task_{name}.rst",
                labels={
                    "model": "{model}",
                    "dataset": "{dataset}",
                    "figure": f"task {name.replace('_', ' ')}",
                },
            )
            for name in TASK_VECTOR_FIGURES
        },
        extra=[
            path
            for name in TASK_VECTOR_FIGURES
            for path in extra_formats(f"results/figures/{{model}}/{{dataset}}/task_{name}")
        ],
    log:
        "logs/plot_task_vectors/{model}/{dataset}.log",
    conda:
        "../../envs/core.yaml"
    params:
        layer=TASK_VECTORS.layer,
        formats=FORMATS,
    script:
        "../scripts/plot_task_vectors.py"
