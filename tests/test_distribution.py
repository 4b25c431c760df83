"""One job over several devices: two XLA host devices stand in for two GPUs.

XLA fixes its device count when JAX starts, so the runs happen in a fresh
process started with `--xla_force_host_platform_device_count=2`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

RUNS = """
import json, sys
from pathlib import Path
import keras, pandas as pd
from lorastudy.distribution import distributed
from lorastudy.finetune import finetune
from lorastudy.generate import generate
from lorastudy.presets import attention_heads, load_causal_lm
from lorastudy.prompts import DEFAULT_TEMPLATE

preset, train, val, test, out = map(Path, sys.argv[1:6])
result = {"devices": len(keras.distribution.list_devices())}
layouts = [(1, 1), (2, 1), (2, 2)]
for devices, model_parallel in layouts:
    run = out / f"{devices}x{model_parallel}"
    adapters = [run / f"adapter_epoch{e}.lora.h5" for e in (1, 2)]
    finetune(preset, train, val, adapters, run / "history.csv", run / "train.json", rank=4, template=DEFAULT_TEMPLATE,
             settings={"learning_rate": 5e-3, "batch_size": 4, "log_every_n_steps": 2, "sequence_length": 64,
                       "pad_multiple": 32, "devices": devices, "model_parallel": model_parallel})
    generate(preset, test, [run / "answers.jsonl"], [run / "generate.json"], DEFAULT_TEMPLATE, adapters=adapters[-1:], rank=4,
             settings={"batch_size": 4, "max_new_tokens": 8, "sampler": "top_k", "devices": devices, "model_parallel": model_parallel})
    history = pd.read_csv(run / "history.csv")
    result[f"{devices}x{model_parallel}"] = {
        "loss": history["loss"].tolist(), "val_loss": history["val_loss"].dropna().tolist(),
        "answers": [json.loads(line)["prediction"] for line in (run / "answers.jsonl").open()],
        "stats_devices": json.loads((run / "train.json").read_text())["devices"],
    }
with distributed(2, 2, heads=attention_heads(preset)):
    attention = load_causal_lm(preset).backbone.get_layer("decoder_block_0").attention
    result["sharding"] = {name: list(getattr(attention, name).kernel.value.sharding.spec) for name in ("query_dense", "key_dense")}
print(json.dumps(result))
"""


def test_several_devices_train_and_answer_as_one(tiny_preset, tiny_data, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "KERAS_BACKEND": "jax"}
    args = [str(tiny_preset), str(tiny_data["train"]), str(tiny_data["val"]), str(tiny_data["test"]), str(tmp_path)]
    done = subprocess.run([sys.executable, "-c", RUNS, *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2
    one = result["1x1"]
    for layout in ("2x1", "2x2"):
        other = result[layout]
        assert other["loss"] == pytest.approx(one["loss"], rel=1e-5), layout
        assert other["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5), layout
        assert other["answers"] == one["answers"], layout
        assert other["stats_devices"] == 2
    # The tiny model has two query heads and one key/value head: queries are
    # split by head, the single key head along the hidden axis.
    assert result["sharding"] == {"query_dense": ["model", "batch", None], "key_dense": [None, "model", None]}


def test_devices_that_do_not_fit_are_clear_errors():
    from lorastudy.distribution import DistributionError, job_distribution

    with pytest.raises(DistributionError, match="devices: 3 asked for, but the job has 1"):
        job_distribution(3)
    with pytest.raises(DistributionError, match=r"model_parallel \(2\) must divide the devices used \(1\)"):
        job_distribution(1, model_parallel=2)
    assert job_distribution("all") is None
