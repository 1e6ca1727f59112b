"""How long the ``maskkit`` command takes to answer before it does any work.

Times three commands that must not import torch: ``maskkit --help``, ``maskkit --version`` and a
mistyped subcommand (``maskkit trian``), each run ``--repeats`` times in a fresh process, and
prints the median, min and max wall time of each (seconds). The first run of each command is
timed too (no warm-up): the page cache is warm after the first command anyway.

    python benchmarks/cli_startup.py                 # 7 repeats each
    python benchmarks/cli_startup.py --repeats 15 --markdown

The ``maskkit`` executable is the one beside this interpreter (a venv's ``bin/``), else the one
on ``PATH``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

#: (label, arguments, expected exit code)
COMMANDS: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("maskkit --help", ("--help",), 0),
    ("maskkit --version", ("--version",), 0),
    ("maskkit trian (mistyped subcommand)", ("trian",), 2),
)


def maskkit_executable() -> str:
    """The ``maskkit`` script of this interpreter's environment, else the one on ``PATH``."""
    beside = Path(sys.executable).with_name("maskkit")
    if beside.is_file():
        return str(beside)
    found = shutil.which("maskkit")
    if found is None:
        raise SystemExit("no `maskkit` executable found: install maskkit in this environment")
    return found


def time_command(
    executable: str, arguments: tuple[str, ...], expected: int | None, repeats: int
) -> list[float]:
    """Wall seconds of ``repeats`` runs of ``executable arguments``; each must exit ``expected``
    (any exit code when None)."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        completed = subprocess.run([executable, *arguments], capture_output=True, text=True)
        seconds.append(time.perf_counter() - start)
        if expected is not None and completed.returncode != expected:
            raise SystemExit(
                f"`maskkit {' '.join(arguments)}` exited {completed.returncode}, expected {expected}: "
                f"{completed.stderr.strip()[-300:]}"
            )
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="runs of each command (default 7)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument(
        "--any-exit",
        action="store_true",
        help="accept any exit code (to time a maskkit older than --version)",
    )
    options = parser.parse_args(argv)
    executable = maskkit_executable()
    rows = []
    for label, arguments, expected in COMMANDS:
        seconds = time_command(executable, arguments, None if options.any_exit else expected, options.repeats)
        rows.append((label, statistics.median(seconds), min(seconds), max(seconds)))
    if options.markdown:
        print(f"| command | median of {options.repeats} | min | max |")
        print("|---|--:|--:|--:|")
        for label, median, low, high in rows:
            print(f"| `{label}` | {median:.2f} s | {low:.2f} s | {high:.2f} s |")
    else:
        for label, median, low, high in rows:
            print(f"{label:<40} median {median:.3f} s  (min {low:.3f}, max {high:.3f}, n={options.repeats})")


if __name__ == "__main__":
    main()
