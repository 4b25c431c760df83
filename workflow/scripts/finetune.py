from lorastudy.worker import run_job

params = dict(snakemake.params)
# In this run's resident worker for the job's GPUs, which it claims (lorastudy.worker, lorastudy.gpus).
run_job(
    "lorastudy.finetune.finetune",
    log=snakemake.log[0],
    gpus=snakemake.resources.gpu,
    resident=params.pop("resident_worker"),
    preset=snakemake.input.preset,
    train_path=snakemake.input.train,
    val_path=snakemake.input.val,
    adapter_paths=list(snakemake.output.adapters),
    history_path=snakemake.output.history,
    stats_path=snakemake.output.stats,
    **params,
)
