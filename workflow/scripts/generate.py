from lorastudy.generate import generate
from lorastudy.gpus import claimed_gpus
from lorastudy.logs import logging_to

params = dict(snakemake.params)
# The job is pinned to as many of the machine's GPUs as it asked for (lorastudy.gpus).
with logging_to(snakemake.log[0]), claimed_gpus(snakemake.resources.gpu):
    generate(
        snakemake.input.preset,
        test_path=snakemake.input.test,
        out_paths=snakemake.output.generations,
        stats_paths=snakemake.output.stats,
        adapters=snakemake.input.get("adapters", []),
        **params,
    )
