from lorastudy.data import filter_context
from lorastudy.logs import logging_to

with logging_to(snakemake.log[0]):
    filter_context(snakemake.input[0], snakemake.output[0], **snakemake.params)
