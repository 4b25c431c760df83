from lorastudy.finetune import finetune
from lorastudy.gpus import claimed_gpus
from lorastudy.logs import logging_to

params = dict(snakemake.params)
# The job is pinned to as many of the machine's GPUs as it asked for (lorastudy.gpus).
with logging_to(snakemake.log[0]), claimed_gpus(snakemake.resources.gpu):
    finetune(
        snakemake.input.preset,
        train_path=snakemake.input.train,
        val_path=snakemake.input.val,
        adapter_paths=snakemake.output.adapters,
        history_path=snakemake.output.history,
        stats_path=snakemake.output.stats,
        **params,
    )
