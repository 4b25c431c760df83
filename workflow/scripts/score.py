from lorastudy.logs import logging_to
from lorastudy.scoring import score_all

with logging_to(snakemake.log[0]):
    score_all(
        list(snakemake.input),
        per_example_paths=snakemake.output.per_example,
        summary_paths=snakemake.output.summary,
        by_category_paths=snakemake.output.by_category,
        processes=snakemake.threads,
        **snakemake.params,
    )
