"""The console maskkit prints its user output to (``maskkit train``'s progress, tables, notes).

Two of rich's defaults do not suit a command's output: ``console.log`` ends each line with the
source line that called it (``pretrain.py:371``), which means nothing to a user; and in a pipe or
a log file rich wraps every line at ``$COLUMNS`` (80 without it), breaking paths and numbers in
the middle, where nothing reads the width. :func:`user_console` turns both off: ``console.log``
keeps its time stamp, and text printed to a pipe or a file stays one line per line (tables and
the live bar still fit a terminal's width).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console


def user_console(**options: Any) -> Console:
    """A :class:`rich.console.Console` (``options`` as rich takes them) with no source links in
    ``log`` and, unless it writes to a terminal, no wrapping of long lines."""
    console = Console(log_path=False, **options)
    if not console.is_terminal and "soft_wrap" not in options:
        console.soft_wrap = True
    return console
