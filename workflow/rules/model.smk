rule prepare_model:
    input:
        unpack(prepare_model_input),
    output:
        directory(paths.PRESET),
    log:
        paths.log("model", "{model}"),
    benchmark:
        paths.benchmark("model", "{model}")
    conda:
        "../envs/model.yaml"
    threads: 4
    resources:
        mem_mb=resource("prepare_model", "mem_mb"),
        runtime=resource("prepare_model", "runtime"),
        cpus_per_task=resource("prepare_model", "cpus_per_task"),
        gpu=resource("prepare_model", "gpu"),
    params:
        spec=lambda wildcards: config["models"][wildcards.model],
        sequence_length=lambda wildcards: model_settings(
            config, wildcards.model, "train"
        )["sequence_length"],
        seed=config["data"]["seed"],
        resident_worker=config["resident_worker"],
    script:
        "../scripts/prepare_model.py"
