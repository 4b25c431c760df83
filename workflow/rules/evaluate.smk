rule generate_base:
    input:
        preset=paths.PRESET,
        test=paths.TEST,
    output:
        generations=paths.generations(paths.BASE),
        stats=paths.generation_stats(paths.BASE),
    log:
        paths.log("generate", f"{{model}}/{paths.BASE}"),
    benchmark:
        paths.benchmark("generate", f"{{model}}/{paths.BASE}")
    params:
        template=lambda wildcards: config["prompt"]["template"],
        settings=settings("generate"),
    threads: 8
    resources:
        mem_mb=resource("generate", "mem_mb"),
        runtime=resource("generate", "runtime"),
        cpus_per_task=resource("generate", "cpus_per_task"),
        gpu=resource("generate", "gpu"),
    script:
        "../../scripts/generate.py"


rule generate:
    input:
        preset=paths.PRESET,
        test=paths.TEST,
        adapter=paths.ADAPTER,
    output:
        generations=paths.generations(paths.RUN),
        stats=paths.generation_stats(paths.RUN),
    log:
        paths.log("generate", f"{{model}}/{paths.RUN}"),
    benchmark:
        paths.benchmark("generate", f"{{model}}/{paths.RUN}")
    params:
        rank=lambda wildcards: int(wildcards.rank),
        template=lambda wildcards: config["prompt"]["template"],
        settings=settings("generate"),
    threads: 8
    resources:
        mem_mb=resource("generate", "mem_mb"),
        runtime=resource("generate", "runtime"),
        cpus_per_task=resource("generate", "cpus_per_task"),
        gpu=resource("generate", "gpu"),
    script:
        "../../scripts/generate.py"


rule score:
    input:
        paths.generations(),
    output:
        **paths.scores(),
    log:
        paths.log("score", "{model}/{run}"),
    params:
        **config["score"],
    script:
        "../../scripts/score.py"
