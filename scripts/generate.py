from lorastudy.generate import generate
from lorastudy.logs import logging_to

with logging_to(snakemake.log[0]):
    generate(
        snakemake.input.preset,
        test_path=snakemake.input.test,
        out_path=snakemake.output.generations,
        stats_path=snakemake.output.stats,
        adapter=snakemake.input.get("adapter"),
        **snakemake.params,
    )
