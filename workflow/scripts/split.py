from lorastudy.data import split_dolly
from lorastudy.logs import logging_to

with logging_to(snakemake.log[0]):
    split_dolly(
        snakemake.input[0],
        test_path=snakemake.output.test,
        val_path=snakemake.output.val,
        counts_path=snakemake.output.counts,
        duplicates_path=snakemake.output.duplicates,
        **snakemake.params,
    )
