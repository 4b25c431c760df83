from lorastudy.gpus import claimed_gpus
from lorastudy.logs import logging_to
from lorastudy.stacked import GroupRun, finetune_group

params = dict(snakemake.params)
# The job is pinned to as many of the machine's GPUs as it asked for (lorastudy.gpus).
with logging_to(snakemake.log[0]), claimed_gpus(snakemake.resources.gpu):
    finetune_group(
        snakemake.input.preset,
        train_path=snakemake.input.train,
        val_path=snakemake.input.val,
        runs=[GroupRun(**run) for run in params.pop("runs")],
        **params,
    )
