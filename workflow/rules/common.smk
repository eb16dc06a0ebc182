# Config validation, target lists and small helpers shared by every stage.
import json
import re

from snakemake.utils import validate

from layerscope.config import check_config, dataset_files, model_files
from layerscope.errors import ConfigError

validate(config, workflow.source_path("../schemas/config.schema.yaml"), set_default=True)

try:
    LAYERS = check_config(config, base_dir=".")
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

MODELS = sorted(config["models"])
DATASETS = sorted(config["datasets"])
ACT = config["activations"]


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)),
    dataset="|".join(map(re.escape, DATASETS)),
    layer=r"\d+",


def stable(obj):
    """Params values as canonical JSON, so reordering keys in the YAML does not rerun jobs."""
    return json.dumps(obj, sort_keys=True)


def model_cfg(wildcards):
    return config["models"][wildcards.model]


def dataset_spec(wildcards):
    return config["datasets"][wildcards.dataset]


def layer_files(model, dataset):
    return expand(
        "results/activations/{model}/{dataset}/layer_{layer}.h5",
        model=model,
        dataset=dataset,
        layer=LAYERS[model],
    )


def all_targets():
    targets = expand("results/datasets/{dataset}/prompts.csv", dataset=DATASETS)
    targets += expand(
        "results/activations/{model}/{dataset}/layers.csv",
        model=MODELS,
        dataset=DATASETS,
    )
    return targets
