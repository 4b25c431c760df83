from lorastudy.generate import generate
from lorastudy.logs import logging_to

with logging_to(snakemake.log[0]):
    generate(
        snakemake.input.preset,
        test_path=snakemake.input.test,
        out_paths=snakemake.output.generations,
        stats_paths=snakemake.output.stats,
        adapters=snakemake.input.get("adapters", []),
        **snakemake.params,
    )
