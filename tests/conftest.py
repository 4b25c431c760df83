from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from lorastudy.controls import make_dolly

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
# Where the real Dolly file is placed when a copy can be had (shared/data/README.md).
REAL_DOLLY = REPO.parent / "shared" / "data" / "databricks-dolly-15k.jsonl"


@pytest.fixture(autouse=True)
def _no_offline_copy_from_environment(monkeypatch):
    # A developer's LORASTUDY_DOLLY_JSONL must not leak into the tests.
    monkeypatch.delenv("LORASTUDY_DOLLY_JSONL", raising=False)


@pytest.fixture
def dolly_file(tmp_path: Path) -> Path:
    return make_dolly(tmp_path / "dolly.jsonl", n=600)


@pytest.fixture
def real_dolly() -> Path:
    if not REAL_DOLLY.is_file():
        pytest.skip(f"the real Dolly file is not at {REAL_DOLLY} (shared/data/README.md: no copy yet)")
    return REAL_DOLLY


# XLA's CPU compiler without LLVM's optimisation passes: the tests' models are tiny, so compiling
# is most of their time, and at level 0 it takes about 0.7x as long (the tiny Gemma 3n's tests:
# 50 s against 34 s, 100 s against 73 s); a step of the real 270M runs 1.25x slower, which its
# few tests' steps can afford. Same program, same numbers to rounding; the study runs at XLA's default.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def pytest_configure(config):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


# Modules that share a costly session fixture (the smoke run; the 270M conversion) run on one
# pytest-xdist worker, so that it is built once; every other module is a group of its own.
_GROUPS = {
    **dict.fromkeys(["test_workflow_smoke", "test_report", "test_secrets", "test_slurm"], "smoke_run"),
    **dict.fromkeys(["test_controls", "test_gguf_convert"], "gemma3_preset"),
}
# The longest groups first (pytest --durations on 2 cores), so that the last to finish is a short one.
_LONGEST = ["test_stacked", "smoke_run", "gemma3_preset", "test_architectures", "test_interruption", "test_gradient_checkpointing",
            "test_distribution", "test_quantize", "test_generate", "test_loss"]


def _group_of(nodeid: str) -> str:
    module = Path(nodeid.split("::", 1)[0]).stem
    return _GROUPS.get(module, module)


def pytest_collection_modifyitems(config, items):
    longest = {group: i for i, group in enumerate(_LONGEST)}
    items.sort(key=lambda item: longest.get(_group_of(item.nodeid), len(longest)))


def pytest_xdist_make_scheduler(config, log):
    """Whole groups to a worker (addopts' `-n auto`); xdist's own loadgroup marks no longer take on pytest 9's node ids."""
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group_of(nodeid)

    return ByGroup(config, log)


@pytest.fixture(scope="session", autouse=True)
def _one_compilation_cache(tmp_path_factory):
    """One persistent XLA cache for the test process, as the study's jobs share one.

    Many tests build the same tiny models' programs again (a resumed run, the
    run it must equal, the second control); they load them instead of
    compiling. Not exported to subprocesses: the workflow tests check the
    cache their config names.
    """
    import jax

    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """Dolly-shaped splits: 32 training, 8 validation, 8 test records."""
    from lorastudy import data

    d = tmp_path_factory.mktemp("tiny_data")
    make_dolly(d / "raw.jsonl", n=90, seed=1)
    data.filter_context(d / "raw.jsonl", d / "filtered.jsonl")
    data.split_dolly(
        d / "filtered.jsonl", d / "test.jsonl", d / "val.jsonl", {"32": d / "train.jsonl"},
        d / "counts.csv", d / "duplicates.csv", {"32": 32}, test_size=8, val_size=8, seed=0,
    )
    return {"train": d / "train.jsonl", "val": d / "val.jsonl", "test": d / "test.jsonl"}


@pytest.fixture(scope="session")
def tiny_preset(tmp_path_factory, tiny_data) -> Path:
    """A random-weight Gemma preset, its tokenizer trained on the tiny training split."""
    from lorastudy.models import prepare_model

    dest = tmp_path_factory.mktemp("tiny_model") / "preset"
    return prepare_model("tiny", {"source": "tiny"}, dest, train_path=tiny_data["train"], sequence_length=64)


@pytest.fixture(scope="session")
def gemma3_preset(tmp_path_factory) -> Path:
    """The real Gemma 3 270M from PyPI, converted once to a KerasHub preset."""
    from lorastudy.models import prepare_model

    return prepare_model("gemma3_270m_q4km", {"source": "pypi_gguf"}, tmp_path_factory.mktemp("g3") / "preset")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """The smoke workflow (config/smoke.yaml), run once with Snakemake, shared by the tests that read it."""
    from dolly_like import SMOKE_DATA
    from workflow_helpers import FAKE_SECRETS, snakemake

    workdir = tmp_path_factory.mktemp("smoke")
    snakemake(
        workdir, "--cores", "2", "--configfile", str(REPO / "config" / "smoke.yaml"),
        # Fake credentials in the environment, which test_secrets greps every output for.
        env={"LORASTUDY_DOLLY_JSONL": str(SMOKE_DATA), **FAKE_SECRETS},
    )
    return workdir


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory, tiny_preset, tiny_data) -> list[Path]:
    """Two epochs of LoRA rank 4 on the tiny model: one adapter per epoch."""
    from lorastudy.finetune import finetune
    from lorastudy.prompts import DEFAULT_TEMPLATE

    out = tmp_path_factory.mktemp("tiny_run")
    adapters = [out / f"adapter_epoch{e}.lora.h5" for e in (1, 2)]
    finetune(
        tiny_preset, tiny_data["train"], tiny_data["val"], adapters, out / "history.csv", out / "train.json",
        rank=4, template=DEFAULT_TEMPLATE,
        settings={"learning_rate": 5e-3, "batch_size": 4, "log_every_n_steps": 2, "sequence_length": 64, "pad_multiple": 32},
    )
    return adapters
