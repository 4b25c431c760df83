from lorastudy.logs import logging_to
from lorastudy.scoring import score_generations

with logging_to(snakemake.log[0]):
    score_generations(
        snakemake.input[0],
        per_example_path=snakemake.output.per_example,
        summary_path=snakemake.output.summary,
        by_category_path=snakemake.output.by_category,
        **snakemake.params,
    )
