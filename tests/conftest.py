from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dolly_like import make_dolly  # noqa: E402

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


def pytest_configure(config):
    os.environ.setdefault("KERAS_BACKEND", "jax")
