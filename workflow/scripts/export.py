from lorastudy.export import export_run
from lorastudy.logs import logging_to

with logging_to(snakemake.log[0]):
    export_run(
        snakemake.input.preset,
        snakemake.input.adapter,
        merged_dest=snakemake.output.merged,
        peft_dest=snakemake.output.peft,
        **snakemake.params,
    )
