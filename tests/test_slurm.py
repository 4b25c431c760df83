"""The smoke workflow through `--executor slurm` on a real single-node SLURM, equal to a local run."""

from __future__ import annotations

import os
import subprocess

import pytest
import slurm_cluster
from dolly_like import SMOKE_DATA
from workflow_helpers import REPO, assert_same_results, snakemake

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if not slurm_cluster.available():
        if os.environ.get("LORASTUDY_REQUIRE_SLURM"):
            pytest.fail("LORASTUDY_REQUIRE_SLURM is set but munged/slurmctld/slurmd are missing (apt install slurm-wlm munge)")
        pytest.skip("SLURM is not installed (apt install slurm-wlm munge)")
    with slurm_cluster.single_node_slurm(tmp_path_factory.mktemp("slurm")) as env:
        yield env


def test_smoke_workflow_runs_through_slurm_and_equals_a_local_run(slurm, smoke_run, tmp_path):
    result = snakemake(
        tmp_path, "--profile", str(REPO / "profiles" / "slurm"),
        # This cluster has no accounting database: job states from squeue, no account to charge.
        "--slurm-status-command", "squeue", "--slurm-no-account",
        "--slurm-init-seconds-before-status-checks", "2", "--retries", "0",
        "--configfile", str(REPO / "config" / "smoke.yaml"),
        env={**slurm, "LORASTUDY_DOLLY_JSONL": str(SMOKE_DATA)},
    )
    local_jobs = sum(1 for line in result.stdout.splitlines() + result.stderr.splitlines() if "localrule " in line)
    queue = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%T %j"], env=slurm, capture_output=True, text=True, check=True)
    states = [line.split()[0] for line in queue.stdout.splitlines()]
    expected = sum(1 for p in smoke_run.glob("logs/**/*.log")) - local_jobs
    assert states and set(states) == {"COMPLETED"}, queue.stdout
    assert len(states) >= expected > 20, (len(states), expected)
    assert (tmp_path / "reports" / "report.html").is_file()
    assert assert_same_results(smoke_run, tmp_path) >= 40
