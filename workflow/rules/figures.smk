# Stage 4: figures per (model, dataset), and across models when there are several.


rule plot_probes:
    input:
        rules.probe_summary.output[0],
    output:
        figure=report(
            "results/figures/{model}/{dataset}/probe_metric_vs_layer.png",
            category="Probes",
            subcategory="{model}",
            caption="../report/probe_metric_vs_layer.rst",
            labels={"model": "{model}", "dataset": "{dataset}", "figure": "probe metric vs layer"},
        ),
        extra=extra_formats("results/figures/{model}/{dataset}/probe_metric_vs_layer"),
    log:
        "logs/plot_probes/{model}/{dataset}.log",
    conda:
        "../../envs/core.yaml"
    params:
        metric=FIGURES.metric,
        formats=FORMATS,
        n_layers=lambda wc: N_LAYERS[wc.model],
    script:
        "../scripts/plot_probes.py"


rule plot_geometry:
    input:
        layers=lambda wc: per_layer(rules.extract_layer.output[0], wc.model, wc.dataset),
        table=rules.prepare_dataset.output.table,
        summary=rules.probe_summary.output[0],
    output:
        **{
            name: report(
                f"results/figures/{{model}}/{{dataset}}/{name}.png",
                category="Geometry",
                subcategory="{model}",
                caption=f"../report/{name}.rst",
                labels={
                    "model": "{model}",
                    "dataset": "{dataset}",
                    "figure": name.replace("_", " "),
                },
            )
            for name in GEOMETRY_FIGURES
        },
        extra=[
            path
            for name in GEOMETRY_FIGURES
            for path in extra_formats(f"results/figures/{{model}}/{{dataset}}/{name}")
        ],
    log:
        "logs/plot_geometry/{model}/{dataset}.log",
    conda:
        "../../envs/core.yaml"
    params:
        view=stable(FIGURE_VIEW),
        formats=FORMATS,
    script:
        "../scripts/plot_geometry.py"


rule plot_tsne:
    input:
        layers=lambda wc: per_layer(rules.extract_layer.output[0], wc.model, wc.dataset),
        table=rules.prepare_dataset.output.table,
    output:
        figure=report(
            "results/figures/{model}/{dataset}/tsne.png",
            category="Geometry",
            subcategory="{model}",
            caption="../report/tsne.rst",
            labels={"model": "{model}", "dataset": "{dataset}", "figure": "tsne"},
        ),
        extra=extra_formats("results/figures/{model}/{dataset}/tsne"),
    log:
        "logs/plot_tsne/{model}/{dataset}.log",
    benchmark:
        "benchmarks/plot_tsne/{model}/{dataset}.tsv"
    conda:
        "../../envs/core.yaml"
    params:
        view=stable({k: FIGURE_VIEW[k] for k in ("component", "pooling")}),
        formats=FORMATS,
    script:
        "../scripts/plot_tsne.py"


rule plot_generalization:
    input:
        rules.generalization.output.table,
    output:
        figure=report(
            "results/figures/{model}/generalization_{group}.png",
            category="Probes",
            subcategory="{model}",
            caption="../report/generalization.rst",
            labels={"model": "{model}", "figure": "generalization {group}"},
        ),
        extra=extra_formats("results/figures/{model}/generalization_{group}"),
    log:
        "logs/plot_generalization/{model}/{group}.log",
    conda:
        "../../envs/core.yaml"
    params:
        formats=FORMATS,
    script:
        "../scripts/plot_generalization.py"


rule depth_comparison:
    input:
        expand(rules.probe_summary.output[0], model=MODELS, allow_missing=True),
    output:
        figure=report(
            "results/figures/models/{dataset}/best_layer_vs_depth.png",
            category="Probes",
            subcategory="models",
            caption="../report/best_layer_vs_depth.rst",
            labels={"model": "all", "dataset": "{dataset}", "figure": "best layer vs depth"},
        ),
        extra=extra_formats("results/figures/models/{dataset}/best_layer_vs_depth"),
    log:
        "logs/depth_comparison/{dataset}.log",
    conda:
        "../../envs/core.yaml"
    params:
        models=MODELS,
        n_layers={m: N_LAYERS[m] for m in MODELS},
        view=stable(FIGURE_VIEW),
        formats=FORMATS,
    script:
        "../scripts/depth_comparison.py"


rule plot_reliability:
    input:
        probes=lambda wc: per_layer(rules.train_probe.output[0], wc.model, wc.dataset),
        summary=rules.probe_summary.output[0],
    output:
        figure=report(
            "results/figures/{model}/{dataset}/reliability.png",
            category="Probes",
            subcategory="{model}",
            caption="../report/reliability.rst",
            labels={"model": "{model}", "dataset": "{dataset}", "figure": "reliability diagram"},
        ),
        extra=extra_formats("results/figures/{model}/{dataset}/reliability"),
    log:
        "logs/plot_reliability/{model}/{dataset}.log",
    conda:
        "../../envs/core.yaml"
    params:
        view=stable(FIGURE_VIEW),
        formats=FORMATS,
    script:
        "../scripts/plot_reliability.py"
