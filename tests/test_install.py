"""The second install route, uv, resolves maskkit with betty-ml 0.1.1, which pip >= 24.1 refuses.

The pip route is README's first command, and CI (.ci/run) runs it in a fresh environment on every
run. The uv route is docs/install.md's; this test runs its install step as written, with
``--dry-run``: uv resolves every requirement against the package registry, betty-ml 0.1.1 and its
non-standard ``torch>=1.6.*`` included, without downloading or installing them (a real install
fetches about 3 GB of CUDA wheels). It skips when uv is not installed (it is in the ``dev``
extra) or the registry cannot be reached, so the suite never depends on the network.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL_DOC = ROOT / "docs" / "install.md"
UNREACHABLE = ("error sending request", "dns error", "failed to connect", "network is unreachable",
               "could not connect", "timed out", "failed to fetch")  # fmt: skip


def _uv() -> str | None:
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def uv_command() -> str:
    """The uv command of docs/install.md ("With uv"), as one line."""
    section = INSTALL_DOC.read_text().split("## With uv", 1)[1].split("\n## ", 1)[0]
    (command,) = re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)[:1]
    return command.strip()


def test_the_documented_uv_command_installs_maskkit_and_runs_the_main_job() -> None:
    steps = uv_command().split(" && ")
    assert steps[0] == "uv venv .venv"
    assert steps[1] == 'uv pip install --python .venv -c requirements/constraints.txt -e ".[dev]"'
    assert steps[2].startswith(".venv/bin/maskkit train --policy mlo")
    # README points at the same route.
    assert " && ".join(steps[:2]) in ROOT.joinpath("README.md").read_text()


def test_uv_resolves_maskkit_with_betty_ml_0_1_1(tmp_path: Path) -> None:
    uv = _uv()
    if uv is None:
        pytest.skip("uv is not installed (pip install uv, or the dev extra)")
    venv = tmp_path / "venv"
    create, install = uv_command().split(" && ")[:2]
    subprocess.run([uv, *shlex.split(create)[1:-1], str(venv), "--quiet"], check=True, timeout=120)
    arguments = [argument.replace(".venv", str(venv)) for argument in shlex.split(install)[1:]]
    result = subprocess.run(
        [uv, *arguments, "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    if result.returncode != 0 and any(sign in output.lower() for sign in UNREACHABLE):
        pytest.skip(f"the package registry cannot be reached: {output.strip().splitlines()[-1]}")
    assert result.returncode == 0, output
    assert "Would install" in output, output
    assert re.search(r"^ \+ betty-ml==0\.1\.1$", output, flags=re.M), output
    assert re.search(r"^ \+ torch==", output, flags=re.M), output


CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
PYPROJECTS = [ROOT / "pyproject.toml", *sorted(ROOT.glob("examples/*/pyproject.toml"))]


def _direct_requirements(extras: tuple[str, ...] | None = None) -> list:
    """The requirements of pyproject.toml: the dependencies and those of ``extras`` (None: all)."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    chosen = [r for name, extra in optional.items() if extras is None or name in extras for r in extra]
    return [Requirement(r) for r in [*project["dependencies"], *chosen] if not r.startswith("maskkit[")]


def _pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{CONSTRAINTS.name}: {line!r} is not a name==version pin"
            pins[canonicalize_name(name)] = version
    return pins


def test_the_constraints_file_pins_every_direct_dependency_to_an_allowed_version() -> None:
    """What CI installs (the dependencies and the dev extra) is pinned, each pin allowed by
    pyproject.toml; the other extras are pinned where the figures' environment had them."""
    from packaging.utils import canonicalize_name

    pins = _pins()
    assert pins["torch"] == "2.14.1"  # the version the published figures were made with
    for requirement in _direct_requirements(extras=("dev",)):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not pinned in requirements/constraints.txt"
    for requirement in _direct_requirements():
        name = canonicalize_name(requirement.name)
        if name in pins:
            assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])
    assert {"tensorboard", "wandb", "mlflow"} <= set(pins)  # the loggers' extras


def test_ci_readme_and_both_documented_routes_install_with_the_constraints_file() -> None:
    flag = "-c requirements/constraints.txt"
    assert flag in ROOT.joinpath(".ci", "run").read_text()
    assert flag in uv_command()
    pip_section = INSTALL_DOC.read_text().split("## With pip", 1)[1].split("\n## ", 1)[0]
    assert f'pip install {flag} -e ".[dev]"' in pip_section
    assert not ROOT.joinpath(".gitignore").read_text().count("constraints")  # the file is tracked


def test_licenses_use_the_spdx_string_form_of_pep_639() -> None:
    import tomllib

    for path in PYPROJECTS:
        document = tomllib.loads(path.read_text())
        assert document["project"]["license"] == "MIT", path  # a table is deprecated by setuptools
        requires = " ".join(document["build-system"]["requires"])
        assert "setuptools>=77" in requires, path  # the first setuptools that reads the string form


BARE_PIP = re.compile(r"^\s*pip install", re.M)


def test_documented_install_commands_name_the_environment_they_install_into() -> None:
    """A bare ``pip install`` may belong to another interpreter (a uv venv has no pip of its own)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *ROOT.glob("examples/*/README.md")]
    for page in pages:
        for block in re.findall(r"```(?:bash|console)\n(.*?)```", page.read_text(), flags=re.S):
            assert not BARE_PIP.search(block), f"{page.relative_to(ROOT)}: a bare `pip install` in {block!r}"


def test_every_package_of_maskkit_is_in_the_wheel() -> None:
    """pyproject.toml names maskkit's packages one by one: a new one left out would be missing
    from the wheel (an editable install would not show it)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / "maskkit").rglob("__init__.py")
        if "__pycache__" not in path.parts
    }
    assert found - listed == set(), "add them to pyproject.toml's [tool.setuptools] packages"
