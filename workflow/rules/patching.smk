# Stage 6: activation patching. `patching` (GPU) computes the tables; `plot_patching` (CPU) draws them,
# so a new figure format reruns only the plot job.


rule patching:
    input:
        pairs=lambda wc: config["patching"]["experiments"][wc.experiment]["pairs"],
        model=lambda wc: model_files(model_cfg(wc).source),
    output:
        **(
            {
                "generation": "results/patching/{model}/{experiment}/generation.csv",
                "generation_summary": report(
                    "results/patching/{model}/{experiment}/generation_summary.csv",
                    category="Patching",
                    subcategory="{model}",
                    caption="../report/patching_generation_summary.rst",
                    labels={
                        "model": "{model}",
                        "experiment": "{experiment}",
                        "table": "generation patching",
                    },
                ),
            }
            if GENERATION_PATCHING
            else {}
        ),
        # n_pairs, notes and the named warnings of the run (the figures' subtitles show them).
        run="results/patching/{model}/{experiment}/run.json",
        cells="results/patching/{model}/{experiment}/cells.csv",
        arrays="results/patching/{model}/{experiment}/arrays.h5",
        summary=report(
            "results/patching/{model}/{experiment}/summary.csv",
            category="Patching",
            subcategory="{model}",
            caption="../report/patching_summary.rst",
            labels={"model": "{model}", "experiment": "{experiment}", "table": "patching summary"},
        ),
    log:
        "logs/patching/{model}/{experiment}.log",
    benchmark:
        "benchmarks/patching/{model}/{experiment}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    params:
        model=lambda wc: stable(model_identity(wc.model)),
        settings=lambda wc: stable(patching_settings(wc.model)),
        precision=PRECISION.to_json() if GENERATION_PATCHING else stable({}),
    script:
        "../scripts/patching.py"


rule plot_patching:
    input:
        **(
            {"generation_summary": rules.patching.output.generation_summary}
            if GENERATION_PATCHING
            else {}
        ),
        summary=rules.patching.output.summary,
        arrays=rules.patching.output.arrays,
        run=rules.patching.output.run,
    output:
        **(
            {
                "heads": report(
                    "results/figures/{model}/patching_{experiment}_heads.png",
                    category="Patching",
                    subcategory="{model}",
                    caption="../report/patching_heads.rst",
                    labels={
                        "model": "{model}",
                        "experiment": "{experiment}",
                        "figure": "patching heads",
                    },
                )
            }
            if PATCHING.heads
            else {}
        ),
        **(
            {
                "generation": report(
                    "results/figures/{model}/patching_{experiment}_generation.png",
                    category="Patching",
                    subcategory="{model}",
                    caption="../report/patching_generation.rst",
                    labels={
                        "model": "{model}",
                        "experiment": "{experiment}",
                        "figure": "generation patching",
                    },
                )
            }
            if GENERATION_PATCHING
            else {}
        ),
        heatmaps=report(
            "results/figures/{model}/patching_{experiment}.png",
            category="Patching",
            subcategory="{model}",
            caption="../report/patching_heatmaps.rst",
            labels={
                "model": "{model}",
                "experiment": "{experiment}",
                "figure": "patching heatmaps",
            },
        ),
        extra=[
            path
            for name in PATCHING_FIGURES
            for path in extra_formats(f"results/figures/{{model}}/patching_{{experiment}}{name}")
        ],
    log:
        "logs/plot_patching/{model}/{experiment}.log",
    conda:
        "../../envs/core.yaml"
    params:
        formats=FORMATS,
    script:
        "../scripts/plot_patching.py"


# Attribution patching (method attribution or screen): every cell estimated from 2 forward passes
# and 1 backward pass per pair; the screen verifies the top cells and a random sample exactly.
rule attribution:
    input:
        pairs=lambda wc: config["patching"]["experiments"][wc.atp_experiment]["pairs"],
        model=lambda wc: model_files(model_cfg(wc).source),
    output:
        table=report(
            "results/patching/{model}/{atp_experiment}/attribution.csv",
            category="Patching",
            subcategory="{model}",
            caption="../report/patching_attribution.rst",
            labels={
                "model": "{model}",
                "experiment": "{atp_experiment}",
                "table": "attribution patching",
            },
        ),
        arrays="results/patching/{model}/{atp_experiment}/attribution.h5",
        summary="results/patching/{model}/{atp_experiment}/attribution_summary.json",
    log:
        "logs/attribution/{model}/{atp_experiment}.log",
    benchmark:
        "benchmarks/attribution/{model}/{atp_experiment}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    params:
        model=lambda wc: stable(model_identity(wc.model)),
        settings=lambda wc: stable(attribution_settings(wc.atp_experiment)),
    script:
        "../scripts/attribution.py"


rule plot_attribution:
    input:
        table=rules.attribution.output.table,
        summary=rules.attribution.output.summary,
    output:
        **(
            {"heads": "results/figures/{model}/attribution_{atp_experiment}_heads.png"}
            if PATCHING.heads
            else {}
        ),
        heatmaps="results/figures/{model}/attribution_{atp_experiment}.png",
        scatter="results/figures/{model}/attribution_{atp_experiment}_scatter.png",
        extra=[
            path
            for name in ["", "_scatter"] + (["_heads"] if PATCHING.heads else [])
            for path in extra_formats(
                f"results/figures/{{model}}/attribution_{{atp_experiment}}{name}"
            )
        ],
    log:
        "logs/plot_attribution/{model}/{atp_experiment}.log",
    conda:
        "../../envs/core.yaml"
    params:
        formats=FORMATS,
    script:
        "../scripts/plot_attribution.py"
