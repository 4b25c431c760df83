from lorastudy.logs import logging_to
from lorastudy.summary import summarize

with logging_to(snakemake.log[0]):
    summarize(
        summary_path=snakemake.output.summary,
        by_category_path=snakemake.output.by_category,
        cells_path=snakemake.output.cells,
        comparisons_path=snakemake.output.comparisons,
        **snakemake.params,
    )
