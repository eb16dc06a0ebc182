from layerscope.layer_index import write_layer_index
from layerscope.scripting import job_logging

with job_logging(snakemake.log[0]) as log:
    write_layer_index(snakemake.input, snakemake.output[0])
    log.info("indexed %d layer files", len(snakemake.input))
