from lorastudy.worker import run_job

params = dict(snakemake.params)
# In this run's resident worker for the job's GPUs, which it claims (lorastudy.worker, lorastudy.gpus).
run_job(
    "lorastudy.stacked.finetune_group",
    log=snakemake.log[0],
    gpus=snakemake.resources.gpu,
    resident=params.pop("resident_worker"),
    preset=snakemake.input.preset,
    train_path=snakemake.input.train,
    val_path=snakemake.input.val,
    **params,
)
