# Stage 2: one batched forward pass per (model, dataset) -> pooled vectors of every layer (the store);
# cheap per-layer jobs cut layer_{layer}.h5 out of it, so adding a layer costs no forward pass.


rule cache_activations:
    input:
        table="results/datasets/{dataset}/prompts.csv",
        model=lambda wc: model_files(model_cfg(wc)["source"]),
    output:
        store="results/activations/{model}/{dataset}/store.h5",
    params:
        # Everything the cached numbers depend on, and nothing else: batch_size and device
        # change results only by float noise, so editing them must not rerun this job.
        model=lambda wc: stable(model_identity(wc.model)),
        activations=lambda wc: stable(ACT),
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    threads: 2
    log:
        "logs/cache_activations/{model}/{dataset}.log",
    benchmark:
        "benchmarks/cache_activations/{model}/{dataset}.tsv"
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/cache_activations.py"


rule extract_layer:
    input:
        store="results/activations/{model}/{dataset}/store.h5",
    output:
        "results/activations/{model}/{dataset}/layer_{layer}.h5",
    log:
        "logs/extract_layer/{model}/{dataset}/layer_{layer}.log",
    conda:
        "../../envs/core.yaml"
    script:
        "../scripts/extract_layer.py"


rule layer_index:
    input:
        lambda wc: per_layer("results/activations/{model}/{dataset}/layer_{layer}.h5", wc.model, wc.dataset),
    output:
        "results/activations/{model}/{dataset}/layers.csv",
    params:
        layers=lambda wc: LAYERS[wc.model],
    log:
        "logs/layer_index/{model}/{dataset}.log",
    conda:
        "../../envs/core.yaml"
    script:
        "../scripts/layer_index.py"
