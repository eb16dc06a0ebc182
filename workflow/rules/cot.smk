# Stage 7: along the chain of thought. `trajectories` (GPU) trains the tuned lens's translators (when
# asked), reads every lens and probe at every layer and position in one forward pass per batch and
# computes lead times; `early_answering` (GPU) truncates the reasoning and lets the model answer;
# plot_* draw.


rule trajectories:
    input:
        table=rules.prepare_dataset.output.table,
        model=lambda wc: model_files(model_cfg(wc).source),
        probes=cot_probe_files,
    output:
        **(
            {"tuned_lens": "results/trajectories/{model}/{dataset}/tuned_lens.npz"}
            if "tuned" in COT.lens
            else {}
        ),
        h5="results/trajectories/{model}/{dataset}/lens.h5",
        positions="results/trajectories/{model}/{dataset}/positions.csv",
        lens="results/trajectories/{model}/{dataset}/lens.csv",
        lens_summary=report(
            "results/trajectories/{model}/{dataset}/lens_summary.csv",
            category="Chain of thought",
            subcategory="{model}",
            caption="../report/cot_lens_summary.rst",
            labels={"model": "{model}", "dataset": "{dataset}", "table": "lens summary"},
        ),
        lens_kl="results/trajectories/{model}/{dataset}/lens_kl.csv",
        probes="results/trajectories/{model}/{dataset}/probe_trajectories.csv",
        lead_time="results/trajectories/{model}/{dataset}/lead_time.csv",
        lead_summary="results/trajectories/{model}/{dataset}/lead_time_summary.csv",
    log:
        "logs/trajectories/{model}/{dataset}.log",
    benchmark:
        "benchmarks/trajectories/{model}/{dataset}.tsv"
    wildcard_constraints:
        dataset=names_regex(COT_DATASETS),
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=60,
    params:
        model=lambda wc: stable(model_identity(wc.model)),
        cot=cot_job_settings("early_answering"),
    script:
        "../scripts/trajectories.py"


rule early_answering:
    input:
        table=rules.prepare_dataset.output.table,
        model=lambda wc: model_files(model_cfg(wc).source),
    output:
        rows="results/cot/{model}/{dataset}/early_answering.csv",
        summary=report(
            "results/cot/{model}/{dataset}/early_answering_summary.csv",
            category="Chain of thought",
            subcategory="{model}",
            caption="../report/cot_early_answering_summary.rst",
            labels={"model": "{model}", "dataset": "{dataset}", "table": "early answering"},
        ),
    log:
        "logs/early_answering/{model}/{dataset}.log",
    benchmark:
        "benchmarks/early_answering/{model}/{dataset}.tsv"
    wildcard_constraints:
        dataset=names_regex(COT_DATASETS),
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=60,
    params:
        model=lambda wc: stable(model_identity(wc.model)),
        early=COT.early_answering.to_json(),
        marker=lambda wc: cot_marker(wc.dataset),
        precision=PRECISION.to_json(),
    script:
        "../scripts/early_answering.py"


rule plot_trajectories:
    input:
        lens_summary=rules.trajectories.output.lens_summary,
        lead_time=rules.trajectories.output.lead_time,
        lead_summary=rules.trajectories.output.lead_summary,
    output:
        heatmap=report(
            "results/figures/{model}/{dataset}/cot_lens_heatmap.png",
            category="Chain of thought",
            subcategory="{model}",
            caption="../report/cot_lens_heatmap.rst",
            labels={"model": "{model}", "dataset": "{dataset}", "figure": "lens heatmap"},
        ),
        lead=report(
            "results/figures/{model}/{dataset}/cot_lead_time.png",
            category="Chain of thought",
            subcategory="{model}",
            caption="../report/cot_lead_time.rst",
            labels={"model": "{model}", "dataset": "{dataset}", "figure": "lead time"},
        ),
        extra=extra_formats("results/figures/{model}/{dataset}/cot_lens_heatmap")
        + extra_formats("results/figures/{model}/{dataset}/cot_lead_time"),
    log:
        "logs/plot_trajectories/{model}/{dataset}.log",
    wildcard_constraints:
        dataset=names_regex(COT_DATASETS),
    conda:
        "../../envs/core.yaml"
    params:
        formats=FORMATS,
    script:
        "../scripts/plot_trajectories.py"


rule plot_early_answering:
    input:
        summary=rules.early_answering.output.summary,
    output:
        figure=report(
            "results/figures/{model}/{dataset}/cot_early_answering.png",
            category="Chain of thought",
            subcategory="{model}",
            caption="../report/cot_early_answering.rst",
            labels={"model": "{model}", "dataset": "{dataset}", "figure": "early answering"},
        ),
        extra=extra_formats("results/figures/{model}/{dataset}/cot_early_answering"),
    log:
        "logs/plot_early_answering/{model}/{dataset}.log",
    wildcard_constraints:
        dataset=names_regex(COT_DATASETS),
    conda:
        "../../envs/core.yaml"
    params:
        formats=FORMATS,
    script:
        "../scripts/plot_early_answering.py"
