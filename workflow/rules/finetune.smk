if config["jobs"] == "grouped":

    # One job per model and subset trains every rank and seed of the grid side
    # by side on one load of the base (lorastudy.stacked), each to the largest
    # epoch count, saving every epoch; each run's files are as a run's own job
    # would write them.
    rule finetune:
        input:
            preset=preset_of_model,
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
        wildcard_constraints:
            # Subsets split into parts have rules of their own (below).
            subset="|".join(WHOLE_SUBSETS) or "(?!)",
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
            resident_worker=config["resident_worker"],
        script:
            "../scripts/finetune_group.py"

    # Where the GPUs outnumber the groups, a subset's runs train in parts: one
    # job per model and part, each part's runs side by side (lorastudy.grouping).
    for subset, parts in SPLIT_SUBSETS.items():
        for part, members in enumerate(parts, 1):

            rule:
                name:
                    f"finetune_{subset}_part{part}"
                input:
                    preset=preset_of_model,
                    train=paths.fill(paths.TRAIN, subset=subset),
                    val=paths.VAL,
                output:
                    adapters=group_files(
                        paths.ADAPTER, subsets=(subset,), epochs=EPOCHS, runs=members
                    ),
                    histories=group_files(
                        paths.HISTORY, subsets=(subset,), runs=members
                    ),
                    stats=group_files(
                        paths.TRAIN_STATS, subsets=(subset,), runs=members
                    ),
                log:
                    paths.log("finetune", f"{{model}}/{subset}_part{part}"),
                benchmark:
                    paths.benchmark("finetune", f"{{model}}/{subset}_part{part}")
                conda:
                    "../envs/model.yaml"
                threads: 8
                resources:
                    mem_mb=resource("finetune", "mem_mb"),
                    runtime=resource("finetune", "runtime"),
                    cpus_per_task=resource("finetune", "cpus_per_task"),
                    gpu=resource("finetune", "gpu"),
                params:
                    runs=lambda wildcards, subset=subset, members=members: paths.group_runs(
                        wildcards.model, subset, members, max(GRID["epochs"])
                    ),
                    template=prompt_template_of_model,
                    settings=settings("train"),
                    checkpoint_dir=lambda wildcards, subset=subset, part=part: paths.GROUP_PART_CHECKPOINTS.format(
                        model=wildcards.model, subset=subset, part=part
                    ),
                    compilation_cache=config["compilation_cache"],
                    resident_worker=config["resident_worker"],
                script:
                    "../scripts/finetune_group.py"

else:

    rule finetune:
        input:
            preset=preset_of_model,
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
            resident_worker=config["resident_worker"],
        script:
            "../scripts/finetune.py"
