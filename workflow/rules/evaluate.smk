if config["jobs"] == "grouped":

    # One job per model answers for the base and every adapter of the grid
    # (each subset, rank, seed and epoch): the model is loaded and its
    # generation compiled once, each adapter loaded into the same variables.
    rule generate:
        input:
            preset=preset_of_model,
            test=paths.TEST,
            adapters=group_files(
                paths.ADAPTER, subsets=GRID["subsets"], epochs=GRID["epochs"]
            ),
        output:
            generations=[paths.generations(paths.BASE)]
            + group_files(
                paths.generations(paths.RUN),
                subsets=GRID["subsets"],
                epochs=GRID["epochs"],
            ),
            stats=[paths.generation_stats(paths.BASE)]
            + group_files(
                paths.generation_stats(paths.RUN),
                subsets=GRID["subsets"],
                epochs=GRID["epochs"],
            ),
        log:
            paths.log("generate", "{model}"),
        benchmark:
            paths.benchmark("generate", "{model}")
        conda:
            "../envs/model.yaml"
        threads: 8
        resources:
            mem_mb=resource("generate", "mem_mb"),
            runtime=resource("generate", "runtime"),
            cpus_per_task=resource("generate", "cpus_per_task"),
            gpu=resource("generate", "gpu"),
        params:
            include_base=True,
            template=prompt_template_of_model,
            settings=settings("generate"),
            quantize=base_quantization,
            compilation_cache=config["compilation_cache"],
            resident_worker=config["resident_worker"],
        script:
            "../scripts/generate.py"

else:

    rule generate_base:
        input:
            preset=preset_of_model,
            test=paths.TEST,
        output:
            generations=[paths.generations(paths.BASE)],
            stats=[paths.generation_stats(paths.BASE)],
        log:
            paths.log("generate", f"{{model}}/{paths.BASE}"),
        benchmark:
            paths.benchmark("generate", f"{{model}}/{paths.BASE}")
        conda:
            "../envs/model.yaml"
        threads: 8
        resources:
            mem_mb=resource("generate", "mem_mb"),
            runtime=resource("generate", "runtime"),
            cpus_per_task=resource("generate", "cpus_per_task"),
            gpu=resource("generate", "gpu"),
        params:
            template=prompt_template_of_model,
            settings=settings("generate"),
            quantize=base_quantization,
            compilation_cache=config["compilation_cache"],
            resident_worker=config["resident_worker"],
        script:
            "../scripts/generate.py"

    # One job per finetune run answers for every epoch of the grid: the base model
    # is loaded and its generation compiled once, then each epoch's adapter is
    # loaded into the same variables.
    rule generate:
        input:
            preset=preset_of_model,
            test=paths.TEST,
            adapters=expand(paths.ADAPTER, epoch=GRID["epochs"], allow_missing=True),
        output:
            generations=expand(
                paths.generations(paths.RUN), epoch=GRID["epochs"], allow_missing=True
            ),
            stats=expand(
                paths.generation_stats(paths.RUN),
                epoch=GRID["epochs"],
                allow_missing=True,
            ),
        log:
            paths.log("generate", f"{{model}}/{paths.JOB}"),
        benchmark:
            paths.benchmark("generate", f"{{model}}/{paths.JOB}")
        conda:
            "../envs/model.yaml"
        threads: 8
        resources:
            mem_mb=resource("generate", "mem_mb"),
            runtime=resource("generate", "runtime"),
            cpus_per_task=resource("generate", "cpus_per_task"),
            gpu=resource("generate", "gpu"),
        params:
            rank=lambda wildcards: int(wildcards.rank),
            template=prompt_template_of_model,
            settings=settings("generate"),
            quantize=base_quantization,
            compilation_cache=config["compilation_cache"],
            resident_worker=config["resident_worker"],
        script:
            "../scripts/generate.py"


# One score job per model scores every answer file of it (its base and every
# run), several processes side by side: one job per file started Python,
# pandas and rouge-score each time, which at the end of the Gemma 2B half left
# the GPU idle for 38 s. Seconds of work: on a cluster it stays on the head
# node (--local-cores) rather than wait in the queue.
localrules:
    score,


rule score:
    input:
        model_run_files(paths.generations()),
    output:
        per_example=model_run_files(paths.scores()["per_example"]),
        summary=model_run_files(paths.scores()["summary"]),
        by_category=model_run_files(paths.scores()["by_category"]),
    log:
        paths.log("score", "{model}"),
    conda:
        "../envs/data.yaml"
    threads: 16
    params:
        **config["score"],
    script:
        "../scripts/score.py"
