# Stage 2: one batched forward pass per (model, dataset) -> pooled vectors of every layer (the store);
# cheap per-layer jobs cut layer_{layer}.h5 out of it, so adding a layer costs no forward pass.
# With shards: N > 1 the forward pass is split into N GPU jobs (whole batches of one global
# batch plan each) and gather_activations joins them into the same store, array for array.


# Writes a few lines of CSV: not worth a cluster job.
localrules:
    layer_index,


rule cache_activations:
    input:
        # Keyed by the prompt texts (written while the DAG is built; see texts_file), not the prompt
        # table: a relabel must not rerun the forward pass (the per-layer files take labels from the table).
        table=lambda wc: texts_file(wc.dataset),
        model=lambda wc: model_files(model_cfg(wc).source),
    output:
        store="results/activations/{model}/{dataset}/store.h5",
    log:
        "logs/cache_activations/{model}/{dataset}.log",
    benchmark:
        "benchmarks/cache_activations/{model}/{dataset}.tsv"
    wildcard_constraints:
        dataset=names_regex(d for d in DATASETS if SHARDS[d] == 1),
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    params:
        # Everything the cached numbers depend on, and nothing else: batch_size and device
        # change results only by float noise, so editing them must not rerun this job.
        model=lambda wc: stable(model_identity(wc.model)),
        activations=lambda wc: ACTIVATIONS.to_json(),
        texts=lambda wc: CHECKED[wc.dataset]["texts_sha256"],
    script:
        "../scripts/cache_activations.py"


# The same job as cache_activations (inputs, params, resources, env, script), for one shard.
use rule cache_activations as cache_shard with:
    output:
        temp("results/activations/{model}/{dataset}/shards/{shard}-of-{n_shards}.h5"),
    log:
        "logs/cache_shard/{model}/{dataset}/{shard}-of-{n_shards}.log",
    benchmark:
        "benchmarks/cache_shard/{model}/{dataset}/{shard}-of-{n_shards}.tsv"
    wildcard_constraints:
        dataset=names_regex(d for d in DATASETS if SHARDS[d] > 1),
        shard=r"\d+",
        n_shards=r"\d+",


rule gather_activations:
    input:
        lambda wc: expand(
            rules.cache_shard.output[0],
            model=wc.model,
            dataset=wc.dataset,
            shard=range(SHARDS[wc.dataset]),
            n_shards=SHARDS[wc.dataset],
        ),
    output:
        store=rules.cache_activations.output.store,
    log:
        "logs/gather_activations/{model}/{dataset}.log",
    benchmark:
        "benchmarks/gather_activations/{model}/{dataset}.tsv"
    wildcard_constraints:
        dataset=names_regex(d for d in DATASETS if SHARDS[d] > 1),
    conda:
        "../../envs/core.yaml"
    resources:
        mem_mb=2000,
        runtime=60,
    script:
        "../scripts/gather_activations.py"


rule extract_layer:
    input:
        store=rules.cache_activations.output.store,
        table=rules.prepare_dataset.output.table,  # labels and groups come from the table
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
        layers=lambda wc: per_layer(rules.extract_layer.output[0], wc.model, wc.dataset),
        table=rules.prepare_dataset.output.table,
    output:
        "results/activations/{model}/{dataset}/layers.csv",
    log:
        "logs/layer_index/{model}/{dataset}.log",
    conda:
        "../../envs/core.yaml"
    params:
        layers=lambda wc: LAYERS[wc.model],
    script:
        "../scripts/layer_index.py"
