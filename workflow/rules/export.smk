rule export:
    input:
        preset=preset_of_model,
        adapter=paths.ADAPTER,
    output:
        merged=directory(paths.EXPORT_MERGED),
        peft=directory(paths.EXPORT_PEFT),
    log:
        paths.log("export", f"{{model}}/{paths.RUN}"),
    conda:
        "../envs/model.yaml"
    resources:
        mem_mb=resource("prepare_model", "mem_mb"),
        runtime=resource("prepare_model", "runtime"),
        cpus_per_task=resource("prepare_model", "cpus_per_task"),
        gpu=0,
    params:
        base_model_name_or_path=lambda wildcards: config["models"][
            wildcards.model
        ].get("hf_name"),
        hf_class=lambda wildcards: config["models"][wildcards.model].get("hf_class"),
    script:
        "../scripts/export.py"


rule export_best:
    default_target: False
    input:
        exports_of_chosen_runs,
