from lorastudy.logs import logging_to
from lorastudy.models import prepare_model

with logging_to(snakemake.log[0]):
    prepare_model(
        snakemake.wildcards.model,
        dest=snakemake.output[0],
        train_path=snakemake.input.get("train"),
        **snakemake.params,
    )
