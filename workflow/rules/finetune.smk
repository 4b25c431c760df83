if config["jobs"] == "grouped":

    # One job per model and subset trains every rank and seed of the grid side
    # by side on one load of the base (lorastudy.stacked), each to the largest
    # epoch count, saving every epoch; each run's files are as a run's own job
    # would write them.
    rule finetune:
        input:
            preset=paths.PRESET,
            train=paths.TRAIN,
            val=paths.VAL,
        output:
            adapters=group_files(paths.ADAPTER, epochs=EPOCHS),
            histories=group_files(paths.HISTORY),
            stats=group_files(paths.TRAIN_STATS),
        log:
            paths.log("finetune", "{model}/{subset}"),
        benchmark:
            paths.benchmark("finetune", "{model}/{subset}")
        conda:
            "../envs/model.yaml"
        threads: 8
        resources:
            mem_mb=resource("finetune", "mem_mb"),
            runtime=resource("finetune", "runtime"),
            cpus_per_task=resource("finetune", "cpus_per_task"),
            gpu=resource("finetune", "gpu"),
        params:
            runs=runs_of_group,
            template=prompt_template_of_model,
            settings=settings("train"),
            checkpoint_dir=lambda wildcards: paths.GROUP_CHECKPOINTS.format(
                model=wildcards.model, subset=wildcards.subset
            ),
            compilation_cache=config["compilation_cache"],
        script:
            "../scripts/finetune_group.py"

else:

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
        script:
            "../scripts/finetune.py"
