from layerscope.analysis.layer_index import write_layer_index
from layerscope.data.consistency import check_files_against_table
from layerscope.jobs.scripting import job_logging

with job_logging(snakemake.log[0]) as log:
    layers = list(snakemake.input.layers)
    check_files_against_table(layers, snakemake.input.table)
    write_layer_index(layers, snakemake.output[0])
    log.info("indexed %d layer files", len(layers))
