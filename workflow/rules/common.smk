# Config validation, target lists and small helpers shared by every stage.
import json
import os
import re

from layerscope.config import (
    check_pair_tokens,
    check_prompt_lengths,
    dataset_files,
    fast_tokenizer_file,
    model_files,
    read_n_layers,
    stop_run,
    validate_config,
)
from layerscope.data.datasets import dry_run_check
from layerscope.errors import ConfigError, LayerscopeError
from layerscope.settings import (
    ActivationSettings,
    CotSettings,
    FigureSettings,
    ModelSettings,
    PatchingSettings,
    PrecisionSettings,
    ProbeCausalSettings,
    ProbeSettings,
    TaskVectorSettings,
)

# Every mistake in the config (unknown key, wrong type, duplicate name, missing file, bad layer, ...)
# stops the run here, before any job, as one line naming the key path; the schema's defaults are filled in.
try:
    LAYERS = validate_config(
        config,
        workflow.source_path("../schemas/config.schema.yaml"),
        configfiles=workflow.configfiles,
        base_dir=".",
    )
except ConfigError as exc:
    stop_run(exc)

MODELS = sorted(config["models"])
DATASETS = sorted(config["datasets"])
# Chain-of-thought datasets are read along positions (rules in cot.smk), not cached pooled or probed.
COT = CotSettings.of({k: v for k, v in config["cot"].items() if k != "datasets"})
COT_DATASETS = sorted(config["cot"]["datasets"])
POOLED_DATASETS = [d for d in DATASETS if d not in COT_DATASETS]
for _d in COT_DATASETS:
    if _d not in DATASETS:
        raise WorkflowError(
            f"cot.datasets: {_d!r} is not a configured dataset (datasets: {', '.join(DATASETS)})"
        )
for _p in COT.probes:
    if _p["dataset"] not in POOLED_DATASETS:
        raise WorkflowError(
            f"cot.probes: dataset {_p['dataset']!r} is not a configured dataset with probes "
            f"({', '.join(POOLED_DATASETS)})"
        )
    for _m in MODELS:
        if _p["layer"] not in LAYERS[_m]:
            raise WorkflowError(
                f"cot.probes: layer {_p['layer']} of {_p['dataset']!r} is not a probed layer of "
                f"model {_m!r} ({LAYERS[_m]})"
            )


def dataset_spec_of(dataset):
    """How to build the prompt table (shards only splits caching, so it is left out); a
    chain-of-thought dataset gets cot.answer_marker unless it has its own."""
    spec = {k: v for k, v in config["datasets"][dataset].items() if k != "shards"}
    if dataset in COT_DATASETS:
        spec.setdefault("answer_marker", COT.answer_marker)
    return spec


def cot_marker(dataset):
    """The answer marker of a chain-of-thought dataset."""
    return dataset_spec_of(dataset)["answer_marker"]


# Every dataset is built here as prepare_dataset will build it (labels, classes, templates, input
# files), so those mistakes stop even a dry run; remembered under .snakemake/ by input size and time.
def texts_file(dataset):
    """The prompt ids and texts of a dataset, written here (not by a rule): the caching job's input.
    A relabel leaves it untouched, so the forward pass is not rerun (a file made by prepare_dataset
    would put caching downstream of a job that every relabel reruns)."""
    return f".snakemake/layerscope/texts/{dataset}.csv"


# Prompts longer than a local model's context are caught here too (hub models: when caching starts).
TOKENIZERS = {
    m: fast_tokenizer_file(config["models"][m]["source"]) for m in sorted(config["models"])
}
try:
    CHECKED = {
        d: dry_run_check(
            d,
            dataset_spec_of(d),
            ".",
            ".snakemake/layerscope/datasets",
            tokenizers={m: t for m, t in TOKENIZERS.items() if t},
            texts_path=texts_file(d),
        )
        for d in DATASETS
    }
    for d in DATASETS:
        check_prompt_lengths(d, CHECKED[d]["longest"], config["models"])
    # Pairs files under each local model's tokenizer (equal lengths, positions inside prompts).
    check_pair_tokens(config, TOKENIZERS)
except LayerscopeError as exc:
    stop_run(exc)
# Typed, frozen settings of every section, built once from the validated config; rules' params
# carry the part of a section that their job depends on, as canonical JSON.
MODEL_SETTINGS = {m: ModelSettings.of(config["models"][m]) for m in MODELS}
ACTIVATIONS = ActivationSettings.of(config["activations"])
PROBES = ProbeSettings.of(config["probes"])
PATCHING = PatchingSettings.of(config["patching"])
PRECISION = PrecisionSettings.of(config["precision"])
TASK_VECTORS = TaskVectorSettings.of(config["task_vectors"])
FIGURES = FigureSettings.of(config["figures"])
# The shard count only splits the work (cached numbers do not depend on it): not a setting of jobs.
SHARDS = {
    d: config["datasets"][d].get("shards") or config["activations"]["shards"] for d in DATASETS
}
N_LAYERS = {
    m: read_n_layers(MODEL_SETTINGS[m].source) or MODEL_SETTINGS[m].n_layers for m in MODELS
}
GENERALIZATION = config["probes"]["generalization"]
# Which cached view the geometry figures show; null means the first configured one.
FIGURE_VIEW = {
    "component": FIGURES.component or ACTIVATIONS.components[0],
    "pooling": FIGURES.pooling or ACTIVATIONS.poolings[0],
    "metric": FIGURES.metric,
}
FORMATS = list(FIGURES.formats)
TASK_GRIDS = sorted(d for d in DATASETS if config["datasets"][d]["kind"] == "task_grid")
TASK_VECTOR_FIGURES = ["separation", "norms", "cosine_chosen", "cosine_best", "pca"]
EXPERIMENTS_ALL = sorted(config["patching"]["experiments"])
# Each experiment's method (its own key, else patching.method): exact experiments run the sweep,
# attribution and screen experiments the attribution job.
METHODS = {
    e: config["patching"]["experiments"][e].get("method") or config["patching"]["method"]
    for e in EXPERIMENTS_ALL
}
EXPERIMENTS = [e for e in EXPERIMENTS_ALL if METHODS[e] == "exact"]
ATTRIBUTION_EXPERIMENTS = [e for e in EXPERIMENTS_ALL if METHODS[e] != "exact"]
GENERATION_PATCHING = PATCHING.generation.enabled
# Suffixes of the patching figures: heatmaps, per-head, generation recovery rate.
PATCHING_FIGURES = (
    [""] + (["_heads"] if PATCHING.heads else []) + (["_generation"] if GENERATION_PATCHING else [])
)
# t-SNE is its own rule (plot_tsne), so turning it on runs that job alone.
GEOMETRY_FIGURES = ["pca", "cosine", "label_means", "norm_heatmap", "norm_curves"]


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)),
    dataset="|".join(map(re.escape, DATASETS)),
    group="|".join(map(re.escape, GENERALIZATION)) or "(?!)",
    experiment="|".join(map(re.escape, EXPERIMENTS)) or "(?!)",
    atp_experiment="|".join(map(re.escape, ATTRIBUTION_EXPERIMENTS)) or "(?!)",
    layer=r"\d+",


def stable(obj):
    """Params values as canonical JSON, so reordering keys in the YAML does not rerun jobs."""
    return json.dumps(obj, sort_keys=True)


def model_cfg(wildcards):
    """The typed settings of the job's model."""
    return MODEL_SETTINGS[wildcards.model]


def dataset_spec(wildcards):
    """How to build the prompt table (see dataset_spec_of)."""
    return dataset_spec_of(wildcards.dataset)


def names_regex(names):
    """A wildcard constraint matching exactly ``names`` (never matching when empty)."""
    return "|".join(map(re.escape, sorted(names))) or "(?!)"


def attribution_settings(experiment):
    """What an attribution job computes from: the sweep's cells, the attribution keys and the
    experiment's method (not the generation settings)."""
    settings = {k: v for k, v in PATCHING.to_dict().items() if k != "generation"}
    settings["method"] = METHODS[experiment]
    return settings


def model_identity(model):
    """The model settings that cached numbers depend on (not batch_size or device: float noise only)."""
    return MODEL_SETTINGS[model].identity()


def task_vector_compute_settings(model):
    """What the task-vector scores depend on (not the heatmap layer, which only the figures use)."""
    tv = {k: v for k, v in TASK_VECTORS.to_dict().items() if k != "layer"}
    tv["component"] = tv["component"] or ACTIVATIONS.components[0]
    return tv


def cot_job_settings(*drop):
    """The cot settings a job computes from (less the parts it never reads)."""
    return stable({k: v for k, v in COT.to_dict().items() if k not in drop})


def cot_probe_files(wc):
    """The probe JSONs the trajectories job applies, in cot.probes order."""
    return [f"results/probes/{wc.model}/{p['dataset']}/layer_{p['layer']}.json" for p in COT.probes]


def patching_settings(model):
    """What a patching job computes from (generation settings only when generation patching is on)."""
    settings = {k: v for k, v in PATCHING.to_dict().items() if k not in ("method", "attribution")}
    if not GENERATION_PATCHING:
        settings["generation"] = {"enabled": False}
    return settings


def per_layer(pattern, model, dataset):
    """``pattern`` (with {model}, {dataset}, {layer}) for every configured layer of ``model``."""
    return expand(pattern, model=model, dataset=dataset, layer=LAYERS[model])


def extra_formats(stem):
    """Paths of the non-PNG copies of a figure (figures.formats), declared so they are tracked."""
    return [f"{stem}.{ext}" for ext in FORMATS if ext != "png"]


def outputs_of(rule, **wildcards):
    """Every output of ``rule`` (a figure in every configured format) for each combination of
    ``wildcards``: all of them are targets, so one that is asked for but missing (t-SNE turned on,
    a format added) is made by its job alone."""
    return expand(list(rule.output), **wildcards)


def figure_targets():
    """Every figure the config asks for, in every format (rules are defined when this is called)."""
    targets = []
    for rule in (rules.plot_probes, rules.plot_geometry, rules.plot_reliability) + (
        (rules.plot_tsne,) if FIGURES.tsne else ()
    ):
        targets += outputs_of(rule, model=MODELS, dataset=POOLED_DATASETS)
    targets += outputs_of(rules.plot_task_vectors, model=MODELS, dataset=TASK_GRIDS)
    targets += outputs_of(rules.plot_generalization, model=MODELS, group=GENERALIZATION)
    if len(MODELS) > 1:
        targets += outputs_of(rules.depth_comparison, dataset=POOLED_DATASETS)
    targets += outputs_of(rules.plot_patching, model=MODELS, experiment=EXPERIMENTS)
    targets += outputs_of(
        rules.plot_attribution, model=MODELS, atp_experiment=ATTRIBUTION_EXPERIMENTS
    )
    targets += outputs_of(rules.plot_steering, model=MODELS, steer=STEER_EXPERIMENTS)
    targets += outputs_of(rules.plot_trajectories, model=MODELS, dataset=COT_DATASETS)
    if COT.early_answering.enabled:
        targets += outputs_of(rules.plot_early_answering, model=MODELS, dataset=COT_DATASETS)
    return targets


def all_targets():
    """The tables of every stage, the run manifest and every figure."""
    targets = expand(rules.prepare_dataset.output.table, dataset=DATASETS)
    for output in (
        rules.layer_index.output[0],
        rules.probe_summary.output[0],
        rules.probe_card.output[0],
        rules.activation_stats.output[0],
    ):
        targets += expand(output, model=MODELS, dataset=POOLED_DATASETS)
    targets += expand(rules.generalization.output.table, model=MODELS, group=GENERALIZATION)
    targets += expand(rules.task_vectors.output.scores, model=MODELS, dataset=TASK_GRIDS)
    targets += expand(rules.patching.output.summary, model=MODELS, experiment=EXPERIMENTS)
    targets += expand(
        rules.attribution.output.summary, model=MODELS, atp_experiment=ATTRIBUTION_EXPERIMENTS
    )
    targets += expand(rules.steering.output.effects, model=MODELS, steer=STEER_EXPERIMENTS)
    targets += expand(rules.trajectories.output.lens, model=MODELS, dataset=COT_DATASETS)
    if COT.early_answering.enabled:
        targets += expand(rules.early_answering.output.rows, model=MODELS, dataset=COT_DATASETS)
    targets.append(rules.manifest.output[0])
    return targets + figure_targets()


def run_summary():
    """What the end of a successful run prints: where each kind of result is, and the report command."""
    shown = [
        os.path.relpath(f) if not os.path.relpath(f).startswith("..") else f
        for f in workflow.overwrite_configfiles
    ]
    configfiles = " ".join(f"--configfile {f}" for f in shown)
    lines = [
        "",
        "layerscope: results are in results/ (logs in logs/, timings in benchmarks/):",
        "  results/probes/{model}/{dataset}/summary.csv   probe metrics per layer",
        "  results/figures/{model}/...                    figures (" + ", ".join(FORMATS) + ")",
        "  results/manifest.json                          versions, config and model hashes of this run",
        "Build the report (every figure and table with captions) with:",
        f"  snakemake --report results/report.html {configfiles}".rstrip(),
    ]
    return "\n".join(lines)


def causal_inputs(wc):
    """Inputs of a probe_causal job: the steering experiment's files, every layer's probe file and
    the probe summary of the direction's dataset (the best layer is read from it)."""
    exp = STEER[(wc.model, wc.steer)]
    ds = exp["direction"]["dataset"]
    files = experiment_inputs(exp, wc.model)
    files["probes"] = per_layer(rules.train_probe.output[0], wc.model, ds)
    files["summary"] = expand(rules.probe_summary.output[0], model=wc.model, dataset=ds)[0]
    return files


def causal_of_dataset(wc):
    """The causal-test tables of the experiments whose direction is this dataset's probe."""
    return [
        f"results/probes/{wc.model}/causal_{e}.csv"
        for e in CAUSAL_STEER
        if STEER[(wc.model, e)]["direction"]["dataset"] == wc.dataset
    ]
