# Stage 5: activation patching experiments (task vectors: task_vectors.smk).


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
