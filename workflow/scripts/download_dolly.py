from lorastudy.data import fetch_dolly
from lorastudy.logs import logging_to

with logging_to(snakemake.log[0]):
    fetch_dolly(snakemake.output[0], **snakemake.params)
