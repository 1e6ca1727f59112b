"""``maskkit --help``, ``--version`` and a mistyped command answer at once: the CLI module and
what it imports at the top never import torch (commands import it when they run)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest
from helpers import MASKKIT_CLI

#: Modules the CLI imports at start-up; none may pull torch in.
STARTUP_MODULES = (
    "maskkit.cli",
    "maskkit.config",
    "maskkit.weighting",
    "maskkit.launch",
    "maskkit.torchrun_env",
)


@pytest.mark.parametrize("module", STARTUP_MODULES)
def test_importing_a_startup_module_does_not_import_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_version_prints_the_installed_package_version():
    result = subprocess.run([*MASKKIT_CLI, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"maskkit {version('maskkit')}"


def test_a_mistyped_command_names_the_nearest_one():
    result = subprocess.run([*MASKKIT_CLI, "trian"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "No such command 'trian'" in result.stderr and "train" in result.stderr
    assert "Traceback" not in result.stderr


def test_distributed_still_exports_the_startup_names():
    """``maskkit.distributed`` re-exports what moved to ``torchrun_env`` (one class, not a copy)."""
    from maskkit import distributed, torchrun_env

    assert distributed.CollectiveFailure is torchrun_env.CollectiveFailure
    assert distributed.DEFAULT_TIMEOUT_S == torchrun_env.DEFAULT_TIMEOUT_S
