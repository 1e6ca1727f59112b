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
    assert steps[1] == 'uv pip install --python .venv -e ".[dev]"'
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
