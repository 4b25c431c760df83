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
        paths.log("finetune", f"{{model}}/{paths.JOB}"),
    benchmark:
        paths.benchmark("finetune", f"{{model}}/{paths.JOB}")
    conda:
        "../envs/model.yaml"
    threads: 8
    resources:
        mem_mb=resource("finetune", "mem_mb"),
        runtime=resource("finetune", "runtime"),
        cpus_per_task=resource("finetune", "cpus_per_task"),
        gpu=resource("finetune", "gpu"),
    params:
        rank=lambda wildcards: int(wildcards.rank),
        template=prompt_template_of_model,
        # The grid's seed is the run's training seed (LoRA initialisation, batch order).
        settings=lambda wildcards: model_settings(config, wildcards.model, "train")
        | {"seed": int(wildcards.seed)},
        compilation_cache=config["compilation_cache"],
        # The job is pinned to this many of the machine's GPUs (lorastudy.gpus).
        gpus=resource("finetune", "gpu"),
    script:
        "../../scripts/finetune.py"
