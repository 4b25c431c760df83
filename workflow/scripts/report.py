from lorastudy.logs import logging_to
from lorastudy.report import render_report

with logging_to(snakemake.log[0]):
    render_report(
        snakemake.input.summary,
        snakemake.input.cells,
        snakemake.input.comparisons,
        snakemake.input.by_category,
        snakemake.input.split_counts,
        snakemake.input.duplicates,
        out_path=snakemake.output[0],
        **snakemake.params,
    )
