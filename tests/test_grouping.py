"""Cutting the grid into grouped finetune jobs for 1, 2, 4 and 8 (pretend) GPUs."""

from __future__ import annotations

import pytest

from lorastudy.grouping import split_groups

# config/paper.yaml: 2 models x 3 subsets, ranks 4, 8, 16 x seeds 0-2.
PAPER = {"1k": 1000, "5k": 5000, "15k": 8685}
RUNS = [(rank, seed) for rank in (4, 8, 16) for seed in range(3)]


def jobs(split, models=2):
    return models * sum(len(parts) for parts in split.values())


@pytest.mark.parametrize("gpus", [1, 2, 4, 6])
def test_as_many_gpus_as_groups_or_fewer_split_nothing(gpus):
    split, why = split_groups(PAPER, RUNS, models=2, gpus=gpus)
    assert all(parts == [RUNS] for parts in split.values())
    assert jobs(split) == 6 and "one finetune job per group" in why


def test_eight_gpus_split_the_largest_subset_so_that_none_waits():
    split, why = split_groups(PAPER, RUNS, models=2, gpus=8)
    assert jobs(split) == 8
    assert [len(p) for p in split["15k"]] == [5, 4] and len(split["5k"]) == len(split["1k"]) == 1
    assert "15k in 2" in why and "8 finetune jobs" in why


def test_parts_cover_every_run_once_in_the_grids_order():
    for gpus in (1, 2, 4, 8, 16, 64):
        split, _ = split_groups(PAPER, RUNS, models=2, gpus=gpus)
        assert jobs(split) <= max(gpus, 6)
        for parts in split.values():
            assert [run for part in parts for run in part] == RUNS and all(parts)


def test_one_model_on_eight_gpus_and_never_a_part_without_a_run():
    split, _ = split_groups({"250": 250}, [(4, 0), (16, 0)], models=1, gpus=8)
    assert split == {"250": [[(4, 0)], [(16, 0)]]}
    split, _ = split_groups(PAPER, RUNS, models=1, gpus=8)
    # The largest part's records x runs goes first: 15k twice before 5k once.
    assert [len(split[s]) for s in ("1k", "5k", "15k")] == [1, 2, 5]


@pytest.mark.parametrize(("gpus", "jobs_expected"), [(1, {"finetune": 6}), (2, {"finetune": 6}), (4, {"finetune": 6}),
                                                     (8, {"finetune": 4, "finetune_15k_part1": 2, "finetune_15k_part2": 2})])
def test_the_workflow_cuts_the_paper_grid_for_the_gpus_it_is_given(gpus, jobs_expected, tmp_path):
    """`--resources gpu=N` (gpus: auto) as a user gives it: the dry run's finetune jobs, and the log's reason."""
    import re

    from workflow_helpers import REPO, snakemake

    done = snakemake(tmp_path, "-n", "--configfile", str(REPO / "config" / "paper.yaml"), "--resources", f"gpu={gpus}")
    counts = dict(re.findall(r"^(finetune\S*)\s+(\d+)$", done.stdout + done.stderr, re.M))
    assert {rule: int(n) for rule, n in counts.items()} == jobs_expected
    assert f"{gpus} GPU" in done.stdout + done.stderr
