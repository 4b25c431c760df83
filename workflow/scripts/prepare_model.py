from lorastudy.worker import run_job

params = dict(snakemake.params)
# In this run's resident worker where the job may share one (lorastudy.worker).
run_job(
    "lorastudy.models.prepare_model",
    log=snakemake.log[0],
    gpus=snakemake.resources.gpu,
    resident=params.pop("resident_worker"),
    name=snakemake.wildcards.model,
    dest=snakemake.output[0],
    train_path=snakemake.input.get("train"),
    **params,
)
