# layerscope: labelled prompts -> per-layer activation caches -> probes, geometry, patching, figures.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/datasets.smk"
include: "workflow/rules/activations.smk"
include: "workflow/rules/probes.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/geometry.smk"
include: "workflow/rules/patching.smk"
include: "workflow/rules/steering.smk"
include: "workflow/rules/manifest.smk"


localrules:
    all,


rule all:
    input:
        all_targets(),
    default_target: True
