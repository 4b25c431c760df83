"""Model sources that need credentials fail clearly, and no secret is ever written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dolly_like import SMOKE_DATA
from workflow_helpers import FAKE_SECRETS, REPO, snakemake, write_config

from lorastudy.models import prepare_model
from lorastudy.presets import ModelError

def test_unknown_preset_names_the_key_and_lists_the_known_ones(tmp_path):
    with pytest.raises(ModelError) as error:
        prepare_model("big", {"source": "keras_hub", "preset": "gemma_9b_xx"}, tmp_path / "preset")
    assert "models.big.preset: unknown KerasHub preset 'gemma_9b_xx'" in str(error.value)
    assert "gemma_2b_en" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_kaggle_credentials_are_a_clear_error(tmp_path, monkeypatch):
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no_kaggle"))
    with pytest.raises(ModelError, match="no Kaggle credentials were found: set KAGGLE_USERNAME and KAGGLE_KEY"):
        prepare_model("gemma_2b", {"source": "keras_hub", "preset": "gemma_2b_en"}, tmp_path / "preset")
    assert not (tmp_path / "preset").exists()


def files_holding(root: Path, secrets: dict[str, str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {var}" for var, value in secrets.items() if value.encode() in data]
    return found


@pytest.mark.slow
def test_a_failed_kaggle_download_with_fake_credentials_writes_no_secret(tmp_path):
    """Offline, KerasHub's download fails; the error says so, and neither it nor any log holds a credential."""
    config = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    config["models"]["gemma_2b"] = {"source": "keras_hub", "preset": "gemma_2b_en"}
    config["grid"]["models"] = ["gemma_2b"]
    path = write_config(tmp_path / "kaggle.yaml", config)
    result = snakemake(tmp_path, "--cores", "1", "results/models/gemma_2b/preset", "--configfile", str(path),
                       check=False, env={**FAKE_SECRETS, "LORASTUDY_DOLLY_JSONL": str(SMOKE_DATA)})
    assert result.returncode != 0
    log = (tmp_path / "logs" / "model" / "gemma_2b.log").read_text()
    assert "model gemma_2b: KerasHub could not load preset gemma_2b_en" in log
    assert not (tmp_path / "results" / "models" / "gemma_2b" / "preset").exists()
    assert files_holding(tmp_path, FAKE_SECRETS) == []
    assert not [var for var, value in FAKE_SECRETS.items() if value in result.stdout + result.stderr]


@pytest.mark.slow
def test_no_log_result_or_report_of_a_run_holds_a_credential(smoke_run):
    """The smoke run has fake credentials in its environment (conftest); grep everything it wrote."""
    assert (smoke_run / "reports" / "report.html").is_file()
    assert files_holding(smoke_run, FAKE_SECRETS) == []
