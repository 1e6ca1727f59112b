"""README's set-up commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    section = ROOT.joinpath("README.md").read_text().split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_has_exactly_two_setup_commands():
    install, tests = _setup_commands()
    assert "python3 -m venv .venv" in install
    assert 'pip install -c requirements/constraints.txt -e ".[dev]"' in install  # the figures' versions
    assert "maskkit train" in install
    assert tests == ".venv/bin/python -m pytest -q"


def test_ci_installs_and_tests_as_the_readme_says():
    install, tests = _setup_commands()
    ci = ROOT.joinpath(".ci", "run").read_text().replace(".venv-ci/", ".venv/")
    for step in install.split(" && ")[1:]:
        if "maskkit train" not in step:  # the main job is a long run; CI runs the tests
            assert step.replace(".venv/bin/pip install", ".venv/bin/pip install --quiet") in ci, step
    assert tests in ci
