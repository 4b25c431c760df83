"""How the grid's runs are cut into grouped finetune jobs for the GPUs a workflow is given.

A group (model × subset) trains all its runs side by side on one load of the
base: the fewer and fuller the groups, the less loading and compiling. But
with more GPUs than groups, some GPUs would idle while the largest groups
train. So a subset's runs are split into parts (every model the same way),
the largest remaining part first, while each split still gives every model's
new job a GPU of its own; never more jobs than GPUs, never a part without a
run. With as many GPUs as groups or fewer, nothing is split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Run = tuple[int, int]  # (rank, seed)


def split_groups(
    records: Mapping[str, int], runs: Sequence[Run], models: int, gpus: int
) -> tuple[dict[str, list[list[Run]]], str]:
    """Each subset's runs in parts, and a sentence saying what was chosen and why (for the log).

    `records`: each subset's training records (its work per run and epoch);
    `runs`: the (rank, seed) of every run of a group, in the grid's order;
    `models`: how many models share the subsets; `gpus`: the GPUs given.
    """
    parts = dict.fromkeys(records, 1)
    groups = models * len(records)

    def work(subset: str) -> float:  # of the subset's largest part
        return records[subset] * math.ceil(len(runs) / parts[subset])

    while True:
        splittable = [s for s in records if parts[s] < len(runs)]
        if not splittable or models * (sum(parts.values()) + 1) > gpus:
            break
        parts[max(splittable, key=work)] += 1
    split = {s: _chunks(list(runs), parts[s]) for s in records}
    jobs = models * sum(parts.values())
    if jobs == groups:
        why = (f"{gpus} GPU(s) for {groups} groups (models x subsets): one finetune job per group, every run of a group "
               "side by side on one load of its base")
    else:
        cut = ", ".join(f"{s} in {parts[s]}" for s in records if parts[s] > 1)
        why = (f"{gpus} GPUs for {groups} groups: subsets split into parts ({cut}; every model alike), {jobs} finetune "
               f"jobs, so that no GPU waits while the largest groups train; each part still trains its runs side by side")
    return split, why


def _chunks(items: list[Run], n: int) -> list[list[Run]]:
    """`items` in `n` contiguous parts whose sizes differ by one at most (the grid's order kept: ranks stay together)."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out
