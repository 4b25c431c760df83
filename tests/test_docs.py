"""Every shell command that README.md, docs/ and config/README.md show runs as written.

Commands are the code lines (indented or fenced) that start with one of the
study's programs. Each runs in a copy of the checkout, the way a reader types
it: Snakemake commands as a dry run (`-n`: the whole DAG is built, the
config validated, every input function called), or for real up to `split`
where the data is at hand (a control file), other commands for real. The
few that cannot run here say why, in NOT_RUN; an entry that no longer
matches a shown command fails the test too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "config" / "README.md"]
PROGRAMS = ("snakemake", "lorastudy", "python3", "python", "pip", "conda", "pytest", "bash", ".venv/bin/")
# What is not run here, and why (a shown command that starts so).
NOT_RUN = {
    "python3 -m venv .venv && .venv/bin/pip install -e '.[test]'": "the test command itself: .ci/run runs it on every submission",
    "snakemake --sdm conda": (
        "needs conda, which this machine and CI's lack; tests/test_environments.py holds workflow/envs' pins to the "
        "tested versions, and the same commands without --sdm conda run here"
    ),
    "pip install snakemake-executor-plugin-slurm": "an install; the test extra holds these plugins, and the SLURM commands below dry-run with them",
    "lorastudy ask --model results/models/gemma3_270m_q4km/preset": (
        "needs the main job's model; tests/test_generate.py asks the tiny model the same way (test_ask_prints_an_answer)"
    ),
    "snakemake --cores 1 --configfile config/paper.yaml --config from_scores=True": (
        "needs a finished paper run's results; tests/test_report.py rebuilds a report from finished results"
    ),
}
# Commands whose data is at hand here: run for real up to the split, so that the data's checks run too.
UNTIL_SPLIT = ("positive_control.yaml", "dolly_like.yaml")


def shown_commands(path: Path) -> list[str]:
    """The shell commands in a Markdown file's code (indented blocks and fences), continuation lines joined."""
    found, fenced, lines, i = [], False, path.read_text().split("\n"), 0
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("```"):
            fenced = not fenced
        else:
            code = line if fenced else (line[4:] if line.startswith("    ") else None)
            text = (code or "").strip()
            while text.endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text[:-1].rstrip() + " " + lines[i].strip()
            words = [w for w in text.split() if not re.fullmatch(r"[A-Z_]+=\S*", w)]
            if words and words[0].startswith(PROGRAMS):
                found.append(re.sub(r"\s+#.*$", "", text))
        i += 1
    return found


COMMANDS = [(path.relative_to(REPO).as_posix(), command) for path in DOCS for command in shown_commands(path)]


def as_run_here(command: str) -> str:
    """The command as this test runs it: set-up steps dropped (.ci/run makes them), Snakemake dry or to the split."""
    steps = [s.strip() for s in command.split("&&") if not re.match(r"python3 -m venv|\S*pip install", s.strip())]
    out = []
    for step in steps:
        step = step.removeprefix(".venv/bin/")
        if re.match(r"(\w+=\S+ )*snakemake ", step) and " -n" not in f" {step}":
            step += " --cores 1 --until split" if any(m in step for m in UNTIL_SPLIT) else " -n"
        out.append(step)
    return " && ".join(out)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the checkout's tracked files, where commands may write what they write."""
    dest = tmp_path_factory.mktemp("checkout")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def test_every_not_run_entry_names_a_shown_command():
    for start in NOT_RUN:
        assert any(command.startswith(start) for _, command in COMMANDS), f"NOT_RUN names no shown command: {start}"
    assert len(COMMANDS) > 10


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}: {c[:60]}" for d, c in COMMANDS])
def test_shown_command_runs_as_written(doc, command, checkout):
    if any(command.startswith(start) for start in NOT_RUN):
        pytest.skip(next(reason for start, reason in NOT_RUN.items() if command.startswith(start)))
    # The study's programs from this interpreter's environment, as the README's set-up leaves them on PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("LORASTUDY_DOLLY_JSONL", None)
    done = subprocess.run(["bash", "-c", as_run_here(command)], cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{doc}: {command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
