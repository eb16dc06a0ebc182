# layerscope: labelled prompts -> per-layer activation caches -> probes, geometry, patching, steering, figures.
from snakemake.utils import min_version

from layerscope.config import check_yaml_syntax, stop_run
from layerscope.errors import LayerscopeError

min_version("9.0")


# The demo config applies only when no --configfile is given: a user's own config stands on its own
# (Snakemake would otherwise merge it into the demo's, and the demo model and datasets would run beside it).
if not workflow.overwrite_configfiles:
    # Snakemake's own message for bad YAML names neither file nor line: check first.
    try:
        check_yaml_syntax("config/config.yaml")
    except LayerscopeError as exc:
        stop_run(exc)

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/datasets.smk"
include: "workflow/rules/activations.smk"
include: "workflow/rules/probes.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/patching.smk"
include: "workflow/rules/steering.smk"
include: "workflow/rules/task_vectors.smk"
include: "workflow/rules/cot.smk"
include: "workflow/rules/manifest.smk"


localrules:
    all,


rule all:
    default_target: True
    input:
        all_targets(),


# The end of a run says where the results are and how to gather them into one report.
onsuccess:
    print(run_summary(), flush=True)
