"""The workflow as the Snakemake workflow catalog checks it: lint-clean and snakefmt-formatted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_snakemake_lint_is_clean():
    done = subprocess.run([str(BIN / "snakemake"), "--lint"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and "Lints for" not in done.stdout + done.stderr, done.stdout + done.stderr


def test_snakefmt_leaves_the_workflow_unchanged():
    done = subprocess.run([str(BIN / "snakefmt"), "--check", "--diff", "workflow"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_python_code_is_clean_by_ruff():
    """The linter configured in pyproject.toml, over everything (src, tests, benchmarks, rule scripts)."""
    done = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
