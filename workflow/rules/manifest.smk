# Run manifest: versions, platform, config hash, seeds and model hashes of this run (no timestamps,
# so an unchanged run rewrites identical bytes). It is rewritten when the config or a local model
# file changes (any config edit reruns only this cheap job); after upgrading packages or changing
# code, refresh it with `snakemake --forcerun manifest`. Environment and commit are deliberately not
# params: a new commit or package does not rerun the results, so it must not relabel them either.


localrules:
    manifest,


rule manifest:
    input:
        # Local model files (config, weights, tokenizer): a retrained model reruns this job.
        models=sorted({path for m in MODELS for path in model_files(config["models"][m]["source"])}),
    output:
        "results/manifest.json",
    log:
        "logs/manifest/manifest.log",
    conda:
        "../../envs/core.yaml"
    params:
        # A function, not a string: the config holds templates with {braces} that are not wildcards.
        config_json=lambda wc: stable(config),
    script:
        "../scripts/write_manifest.py"
