rule finetune:
    input:
        preset=paths.PRESET,
        train=paths.TRAIN,
        val=paths.VAL,
    output:
        adapters=expand(paths.ADAPTER, epoch=EPOCHS, allow_missing=True),
        history=paths.HISTORY,
        stats=paths.TRAIN_STATS,
    log:
        paths.log("finetune", "{model}/{subset}_r{rank}"),
    benchmark:
        paths.benchmark("finetune", "{model}/{subset}_r{rank}")
    params:
        rank=lambda wildcards: int(wildcards.rank),
        template=lambda wildcards: config["prompt"]["template"],
        settings=settings("train"),
        compilation_cache=config["compilation_cache"],
    threads: 8
    resources:
        mem_mb=resource("finetune", "mem_mb"),
        runtime=resource("finetune", "runtime"),
        cpus_per_task=resource("finetune", "cpus_per_task"),
        gpu=resource("finetune", "gpu"),
    script:
        "../../scripts/finetune.py"
