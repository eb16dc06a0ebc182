# Stage 6: steering along found directions (probe, mass-mean, task vector or a user file), with a
# random-direction null band and a damage guard; one GPU job per (model, experiment), one plot job.
from layerscope.jobs.steering_run import (
    check_experiment_files,
    d_model_of,
    experiment_inputs,
    resolve_experiment,
)

STEER_EXPERIMENTS = sorted(config["steering"]["experiments"])
try:
    # Every experiment resolved for every model at parse time: a bad layer, dataset or source stops here.
    STEER = {
        (m, e): resolve_experiment(config, e, m, LAYERS, N_LAYERS)
        for m in MODELS
        for e in STEER_EXPERIMENTS
    }
    # Every file an experiment names is read here as the job will read it: Snakemake keeps an
    # existing output whose input file is gone, so only the dry run can catch a missing one.
    for (m, e), exp in sorted(STEER.items()):
        check_experiment_files(exp, f"steering.experiments.{e}", N_LAYERS[m], d_model_of(config, m))
except ConfigError as exc:
    stop_run(exc)


rule steering:
    input:
        unpack(lambda wc: experiment_inputs(STEER[(wc.model, wc.steer)], wc.model)),
        model=lambda wc: model_files(model_cfg(wc).source),
    output:
        effects=report(
            "results/steering/{model}/{steer}/effects.csv",
            category="Steering",
            subcategory="{model}",
            caption="../report/steering_effects.rst",
            labels={"model": "{model}", "experiment": "{steer}", "table": "steering effects"},
        ),
        per_prompt="results/steering/{model}/{steer}/per_prompt.csv",
        norms="results/steering/{model}/{steer}/norms.csv",
        generations="results/steering/{model}/{steer}/generations.csv",
        summary="results/steering/{model}/{steer}/summary.json",
    log:
        "logs/steering/{model}/{steer}.log",
    benchmark:
        "benchmarks/steering/{model}/{steer}.tsv"
    wildcard_constraints:
        steer=names_regex(STEER_EXPERIMENTS),
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=60,
    params:
        model=lambda wc: stable(model_identity(wc.model)),
        experiment=lambda wc: stable(STEER[(wc.model, wc.steer)]),
        precision=PRECISION.to_json(),
    script:
        "../scripts/steering.py"


rule plot_steering:
    input:
        effects=rules.steering.output.effects,
        summary=rules.steering.output.summary,
    output:
        figure=report(
            "results/figures/{model}/steering_{steer}.png",
            category="Steering",
            subcategory="{model}",
            caption="../report/steering_dose_response.rst",
            labels={
                "model": "{model}",
                "experiment": "{steer}",
                "figure": "steering dose-response",
            },
        ),
        extra=extra_formats("results/figures/{model}/steering_{steer}"),
    log:
        "logs/plot_steering/{model}/{steer}.log",
    wildcard_constraints:
        steer=names_regex(STEER_EXPERIMENTS),
    conda:
        "../../envs/core.yaml"
    params:
        formats=FORMATS,
    script:
        "../scripts/plot_steering.py"


# Causal test of the probe families' directions (issue 20): for every steering experiment whose
# direction is a probe, at the dataset's best probe layer (and probes.causal.layers).
CAUSAL = ProbeCausalSettings.of(config["probes"].get("causal", {}))
CAUSAL_STEER = (
    sorted(e for e in STEER_EXPERIMENTS if STEER[(MODELS[0], e)]["direction"]["source"] == "probe")
    if CAUSAL.enabled and MODELS
    else []
)
for _m in MODELS:
    _bad = sorted(set(CAUSAL.layers) - set(LAYERS[_m]))
    if _bad:
        raise WorkflowError(
            f"probes.causal.layers: {_bad} are not configured layers of model {_m!r}: {LAYERS[_m]}"
        )


rule probe_causal:
    input:
        unpack(causal_inputs),
        model=lambda wc: model_files(model_cfg(wc).source),
    output:
        "results/probes/{model}/causal_{steer}.csv",
    log:
        "logs/probe_causal/{model}/{steer}.log",
    benchmark:
        "benchmarks/probe_causal/{model}/{steer}.tsv"
    wildcard_constraints:
        steer=names_regex(CAUSAL_STEER) if CAUSAL_STEER else "^$",
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=30,
    params:
        model=lambda wc: stable(model_identity(wc.model)),
        experiment=lambda wc: stable(STEER[(wc.model, wc.steer)]),
        causal=CAUSAL.to_json(),
        metric=FIGURES.metric,
    script:
        "../scripts/probe_causal.py"


rule probe_card:
    input:
        summary=rules.probe_summary.output[0],
        causal=causal_of_dataset,
    output:
        report(
            "results/probes/{model}/{dataset}/probe_card.csv",
            category="Probes",
            subcategory="{model}",
            caption="../report/probe_card.rst",
            labels={"model": "{model}", "dataset": "{dataset}", "table": "probe card"},
        ),
    log:
        "logs/probe_card/{model}/{dataset}.log",
    conda:
        "../../envs/core.yaml"
    params:
        view=stable({"metric": FIGURES.metric}),
    script:
        "../scripts/probe_card.py"
