"""Running the ``maskkit`` command in tests: in a subprocess (waited for, or in the background),
or in this process through ``maskkit.cli.main()``; and what a user error must look like."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import MASKKIT_CLI
from plugin_isolation import SITES_VARIABLE

from maskkit import cli

#: ``maskkit`` in a subprocess, seeing only maskkit's own plugins (``helpers.MASKKIT_CLI``).
MASKKIT = MASKKIT_CLI


def maskkit(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """``maskkit ARGS`` in a subprocess, 120 columns wide, waited for."""
    environment = {**os.environ, "COLUMNS": "120", **(env or {})}
    return subprocess.run(
        [*MASKKIT, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=environment, timeout=600
    )


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: exit code 2, no traceback, stderr one ``error:`` message holding ``fragments``."""
    assert result.returncode == 2, result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())  # rich may wrap long lines
    assert message.startswith("error:"), message
    for fragment in fragments:
        assert fragment in message, message


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


class BackgroundCli:
    """``maskkit ARGS`` started in the background; :meth:`result` waits for it.

    Output goes to temporary files, not pipes, so a chatty run never blocks on a full pipe.
    """

    def __init__(
        self,
        args: list[str],
        cwd: Path,
        site: Path | None = None,
        columns: int | None = 250,
        hidden_site: Path | None = None,
    ) -> None:
        env = {key: value for key, value in os.environ.items() if key not in {"PYTHONPATH", "FORCE_COLOR"}}
        env.pop("MASKKIT_DATA_DIR", None)
        # ``site``'s plugins are visible to the CLI; ``hidden_site`` is importable but stands for
        # plugins installed elsewhere in the environment, which the tests must not see.
        on_path = [str(folder) for folder in (site, hidden_site) if folder is not None]
        env["PYTHONPATH"] = os.pathsep.join(on_path)
        env[SITES_VARIABLE] = str(site) if site is not None else ""
        env.pop("COLUMNS", None)
        if columns is not None:
            env["COLUMNS"] = str(columns)  # a wide table: one row per line
        env["PYTHONWARNINGS"] = "ignore"  # stderr is checked line by line
        env["OMP_NUM_THREADS"] = "1"  # several runs share a few cores
        # files that outlive this call; closed when the object goes
        self.stdout = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.cwd = cwd
        self.process = subprocess.Popen(
            [*MASKKIT_CLI, *args],
            cwd=cwd,
            env=env,
            stdout=self.stdout,
            stderr=self.stderr,
            text=True,
        )

    def result(self, timeout: float = 300) -> CliResult:
        try:
            returncode = self.process.wait(timeout=timeout)
        finally:
            self.stop()
        self.stdout.seek(0)
        self.stderr.seek(0)
        return CliResult(returncode, self.stdout.read(), self.stderr.read())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def run_cli_in_process(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> CliResult:
    """``maskkit.cli.main()`` in this process: the same error handling, without a fresh interpreter."""
    monkeypatch.setattr(sys, "argv", ["maskkit", *args])
    monkeypatch.setenv("COLUMNS", "250")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.main()
    captured = capsys.readouterr()
    return CliResult(int(exited.value.code or 0), captured.out, captured.err)


def assert_one_clean_error_line(result: CliResult, *fragments: str) -> str:
    """Exit code 2, no traceback, and stderr exactly one ``error:`` line holding ``fragments``."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert len(result.stderr_lines) == 1, result.stderr
    line = result.stderr_lines[0]
    assert line.startswith("error:"), line
    for fragment in fragments:
        assert fragment in line, line
    return line


def train_args(policy: str, data_dir: Path, run_dir: Path) -> list[str]:
    """``maskkit train`` of ``policy`` at the smoke preset on the CPU, into ``run_dir``."""
    return [
        "train",
        "--policy",
        policy,
        "--dataset",
        "dermamnist",
        "--data-dir",
        str(data_dir),
        "--preset",
        "smoke",
        "--device",
        "cpu",
        "--run-dir",
        str(run_dir),
    ]


def listed_policies(stdout: str) -> dict[str, dict[str, str]]:
    """Parse the ``maskkit policies`` table: name → {distribution, learnable, needs}."""
    rows: dict[str, dict[str, str]] = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) == 5 and cells[0] and cells[0] != "name":
            rows[cells[0]] = {"distribution": cells[1], "learnable": cells[2], "needs": cells[3]}
    return rows


def last_checkpoint_step(run_dir: Path) -> int:
    """The step of a run dir's ``last`` checkpoint, -1 while it has none (or is being written)."""
    pointer = run_dir / "checkpoints" / "last.json"
    try:
        return json.loads(pointer.read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return -1
