# Compute nodes of a cluster often have no internet: download on the head node.
# Filtering and splitting take a second or two; on a cluster they would wait in
# the queue longer than they run, so they run there too.
localrules:
    download_dolly,
    filter_context,
    split,


rule download_dolly:
    output:
        paths.RAW_DOLLY,
    log:
        paths.log("data", "download_dolly"),
    conda:
        "../envs/data.yaml"
    params:
        url=config["dolly"]["url"],
        sha256=config["dolly"]["sha256"],
        size_bytes=config["dolly"]["size_bytes"],
        local_copy=config["dolly"]["local_copy"],
    script:
        "../scripts/download_dolly.py"


rule filter_context:
    input:
        paths.RAW_DOLLY,
    output:
        paths.FILTERED,
    log:
        paths.log("data", "filter_context"),
    conda:
        "../envs/data.yaml"
    params:
        mode=config["data"]["context"],
        # A function, so that Snakemake does not read {instruction} as a wildcard.
        context_template=lambda wildcards: config["prompt"]["context_template"],
    script:
        "../scripts/filter_context.py"


rule split:
    input:
        paths.FILTERED,
    output:
        test=paths.TEST,
        val=paths.VAL,
        train=expand(paths.TRAIN, subset=SUBSETS),
        counts=paths.SPLIT_COUNTS,
        duplicates=paths.DUPLICATES,
    log:
        paths.log("data", "split"),
    conda:
        "../envs/data.yaml"
    params:
        train_paths={s: paths.TRAIN.format(subset=s) for s in SUBSETS},
        subsets=config["data"]["subsets"],
        test_size=config["data"]["test_size"],
        val_size=config["data"]["val_size"],
        seed=config["data"]["seed"],
    script:
        "../scripts/split.py"
