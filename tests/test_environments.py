"""The software pins agree everywhere: environment.yml, each rule's conda
environment (workflow/envs/), the pip route's lock (constraints.txt), and the
versions this test run imports."""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
ENV_FILES = [REPO / "environment.yml", *sorted((REPO / "workflow" / "envs").glob("*.yaml"))]
LOCK = REPO / "constraints.txt"


def pin_of(line: str) -> tuple[str, str] | None:
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==?([^=\s]+)", line.strip())
    return (canonicalize_name(match.group(1)), match.group(2)) if match else None


def pins(path: Path) -> dict[str, str]:
    """`package -> version` for every `name==version` pip line and `name=version` conda line of an environment file or the lock."""
    if path.suffix == ".txt":
        lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    else:
        entries = yaml.safe_load(path.read_text())["dependencies"]
        lines = [line for entry in entries for line in (entry["pip"] if isinstance(entry, dict) else [entry])]
    return dict(pin for pin in map(pin_of, lines) if pin)


ALL_PINS = {path.relative_to(REPO).as_posix(): pins(path) for path in [*ENV_FILES, LOCK]}


def test_every_rule_names_an_environment_that_exists():
    rules = REPO / "workflow" / "rules"
    named = {m for f in rules.glob("*.smk") for m in re.findall(r'conda:\s*\n\s*"([^"]+)"', f.read_text())}
    assert named == {"../envs/data.yaml", "../envs/model.yaml"}
    for path in named:
        assert (rules / path).is_file(), path


@pytest.mark.parametrize("package", sorted({p for found in ALL_PINS.values() for p in found}))
def test_a_package_has_one_version_everywhere_and_it_is_the_tested_one(package):
    versions = {path: found[package] for path, found in ALL_PINS.items() if package in found}
    assert len(set(versions.values())) == 1, f"{package} is pinned differently: {versions}"
    pinned = next(iter(versions.values()))
    if package == "python":
        assert f"{sys.version_info.major}.{sys.version_info.minor}" == pinned
        return
    try:
        installed = version(package)
    except PackageNotFoundError:
        pytest.fail(f"{package} is pinned ({versions}) but not installed in the test run")
    assert installed.split("+")[0] == pinned, f"{package}: the tests import {installed}, the environments pin {versions}"


def installed_closure(name: str, extras: set[str]) -> set[str]:
    """The installed distributions that `name[extras]` needs, transitively."""
    found: dict[str, set[str]] = {}
    todo = [(name, extras | {""})]
    while todo:
        dist, wanted = todo.pop()
        key = canonicalize_name(dist)
        wanted = wanted - found.get(key, set())
        try:
            requires = distribution(dist).requires or []
        except PackageNotFoundError:
            continue  # a marker-excluded or optional dependency that is not installed
        if not wanted:
            continue
        found.setdefault(key, set()).update(wanted)
        for requirement in map(Requirement, requires):
            if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in wanted):
                todo.append((requirement.name, set(requirement.extras) | {""}))
    return set(found) - {canonicalize_name(name)}


def test_the_lock_holds_every_package_the_study_and_its_tests_need():
    missing = installed_closure("lorastudy", {"test", "slurm"}) - set(pins(LOCK))
    assert not missing, f"constraints.txt lacks {sorted(missing)}: add them at their installed versions"
