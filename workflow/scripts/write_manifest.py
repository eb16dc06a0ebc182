import json

from layerscope.jobs.manifest import write_manifest
from layerscope.jobs.scripting import job_logging

with job_logging(snakemake.log[0]) as log:
    manifest = write_manifest(snakemake.output[0], json.loads(snakemake.params.config_json))
    log.info(
        "layerscope %s (commit %s), config sha256 %s, models: %s",
        manifest["layerscope"]["version"],
        manifest["layerscope"]["git"]["commit"],
        manifest["config_sha256"],
        ", ".join(
            f"{name} {m.get('sha256') or m.get('revision') or m['source']}"
            for name, m in manifest["models"].items()
        ),
    )
