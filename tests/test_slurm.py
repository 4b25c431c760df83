"""The smoke workflow through `--executor slurm` on a real single-node SLURM, equal to a local run."""

from __future__ import annotations

import collections
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


# This cluster has no accounting database: job states from squeue, no account to charge.
THROUGH_SLURM = (
    "--slurm-status-command", "squeue", "--slurm-no-account", "--slurm-init-seconds-before-status-checks", "2", "--retries", "0",
)
# The GPU jobs ask for a GPU each, as on a real cluster (config/paper.yaml).
ONE_GPU_EACH = "resources:\n  finetune: {gpu: 1}\n  generate: {gpu: 1}\n"


def slurm_jobs(env) -> list[dict[str, str]]:
    """Every job SLURM still holds, as `scontrol show job -d` reports it: a dict of its fields."""
    out = subprocess.run(["scontrol", "show", "job", "-d", "-o"], env=env, capture_output=True, text=True, check=True).stdout
    return [dict(field.split("=", 1) for field in line.split() if "=" in field) for line in out.splitlines() if line.strip()]


def test_smoke_workflow_runs_through_slurm_and_equals_a_local_run(slurm, smoke_run, tmp_path):
    (tmp_path / "one_gpu_each.yaml").write_text(ONE_GPU_EACH)
    result = snakemake(
        tmp_path, "--profile", str(REPO / "profiles" / "slurm"), *THROUGH_SLURM,
        "--configfile", str(REPO / "config" / "smoke.yaml"), str(tmp_path / "one_gpu_each.yaml"),
        env={**slurm, "LORASTUDY_DOLLY_JSONL": str(SMOKE_DATA)},
    )
    local_jobs = sum(1 for line in result.stdout.splitlines() + result.stderr.splitlines() if "localrule " in line)
    queue = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%T %j"], env=slurm, capture_output=True, text=True, check=True)
    states = [line.split()[0] for line in queue.stdout.splitlines()]
    expected = sum(1 for p in smoke_run.glob("logs/**/*.log")) - local_jobs
    assert states and set(states) == {"COMPLETED"}, queue.stdout
    assert len(states) >= expected >= 4, (len(states), expected)
    assert (tmp_path / "reports" / "report.html").is_file()
    assert assert_same_results(smoke_run, tmp_path) >= 40
    # SLURM's own record of what each job was given: the GPU rules one GPU each, the rest none.
    given = collections.defaultdict(set)
    for job in slurm_jobs(slurm):
        given[job["Comment"].removeprefix("rule_").split("_wildcards_")[0]].add(job["JOB_GRES"])
    # (generate_base runs only with jobs: per_run; grouped, the model's generate job answers for the base.)
    assert {"finetune", "generate"} <= given.keys()
    assert {rule: gres for rule, gres in given.items() if rule in GPU_RULES} == {rule: {"gpu:1"} for rule in GPU_RULES & given.keys()}
    assert all(gres == {"(null)"} for rule, gres in given.items() if rule not in GPU_RULES), dict(given)


GPU_RULES = {"finetune", "generate", "generate_base"}


def test_a_job_asking_for_more_gpus_than_the_node_has_fails_with_slurms_reason(slurm, tmp_path):
    result = snakemake(
        tmp_path, "--profile", str(REPO / "profiles" / "slurm"), *THROUGH_SLURM,
        "--configfile", str(REPO / "config" / "smoke.yaml"), "--set-resources", f"prepare_model:gpu={len(slurm_cluster.GPU_FILES) + 1}",
        "--until", "prepare_model",
        env={**slurm, "LORASTUDY_DOLLY_JSONL": str(SMOKE_DATA)}, check=False,
    )
    assert result.returncode != 0
    assert "Requested node configuration is not available" in result.stdout + result.stderr
