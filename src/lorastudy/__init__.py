"""lorastudy: a reproducible study of LoRA fine-tuning of Gemma on Dolly 15k.

Each stage of the Snakemake DAG is one module here (`data`, `prompts`,
`models`, `finetune`, `generate`, `scoring`, `plots`, `report`); the rule
scripts under `workflow/scripts/` only read `snakemake.*` and call one function.
"""

import os

# KerasHub runs on any Keras backend; this study is defined on JAX, and the
# backend must be chosen before the first `import keras`.
os.environ.setdefault("KERAS_BACKEND", "jax")

from lorastudy import imports, quiet  # noqa: E402

quiet.install()
imports.install()

__version__ = "0.1.0"
