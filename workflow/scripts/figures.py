from lorastudy.logs import logging_to
from lorastudy.plots import render_figures

with logging_to(snakemake.log[0]):
    render_figures(
        snakemake.input.summary,
        snakemake.input.cells,
        snakemake.input.by_category,
        runs=snakemake.params.runs,
        png=snakemake.output.png,
        pdf=snakemake.output.pdf,
        processes=snakemake.threads,
    )
