# Config validation, wildcard constraints and input functions. Stage files
# hold only rules; every path comes from lorastudy.paths.
from pathlib import Path

from lorastudy import paths
from lorastudy.config import validate_config

validate_config(config, Path(workflow.basedir) / "schemas" / "config.schema.yaml")

SUBSETS = list(config["data"]["subsets"])


wildcard_constraints:
    subset="|".join(SUBSETS),


def get_final_output():
    return [paths.SPLIT_COUNTS]
