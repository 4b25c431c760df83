from lorastudy.worker import run_job

params = dict(snakemake.params)
# In this run's resident worker for the job's GPUs, which it claims (lorastudy.worker, lorastudy.gpus).
run_job(
    "lorastudy.generate.generate",
    log=snakemake.log[0],
    gpus=snakemake.resources.gpu,
    resident=params.pop("resident_worker"),
    preset=snakemake.input.preset,
    test_path=snakemake.input.test,
    out_paths=list(snakemake.output.generations),
    stats_paths=list(snakemake.output.stats),
    adapters=list(snakemake.input.get("adapters", [])),
    **params,
)
