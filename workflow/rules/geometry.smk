# Stage 5: task-vector geometry of task-grid datasets (activation patching: patching.smk).


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

