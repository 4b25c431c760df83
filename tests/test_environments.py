"""The software pins agree everywhere: environment.yml, each rule's conda
environment (workflow/envs/), and the versions this test run imports."""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ENV_FILES = [REPO / "environment.yml", *sorted((REPO / "workflow" / "envs").glob("*.yaml"))]


def pins(path: Path) -> dict[str, str]:
    """`package -> version` for every `name==version` pip line and `name=version` conda line of an environment file."""
    found = {}
    for entry in yaml.safe_load(path.read_text())["dependencies"]:
        for line in entry["pip"] if isinstance(entry, dict) else [entry]:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==?([^=\s]+)", line)
            if match:
                found[match.group(1).lower()] = match.group(2)
    return found


ALL_PINS = {path.relative_to(REPO).as_posix(): pins(path) for path in ENV_FILES}


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
