"""What the command line needs to know about torchrun before torch is imported.

:mod:`maskkit.distributed` imports torch; ``maskkit --help`` must not. The few names the CLI
reads at start-up (the collective timeout's default, whether this process is a torchrun worker,
the failure of a collective) live here, and :mod:`maskkit.distributed` re-exports them; so does
the one thing a worker tells the ``--nproc`` launcher (:func:`note_run_dir`), so that the engine
never imports the launcher.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Seconds a collective waits for the other processes before the run stops (``--collective-timeout``).
DEFAULT_TIMEOUT_S = 600.0

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
#: Set by the ``--nproc`` launcher (:mod:`maskkit.launch`) for its workers: the file in which rank 0
#: notes the run dir, so that the launcher's failure message can name it.
RUN_DIR_NOTE = "MASKKIT_RUN_DIR_NOTE"


class CollectiveFailure(RuntimeError):
    """A collective could not complete: another process died, raised an error, or did not answer
    within the collective timeout. The process that hit it stops; torchrun stops the others."""


def launched_by_torchrun() -> bool:
    """Whether this process is a worker that torchrun started (its rank variables are set)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def note_run_dir(path: Path) -> None:
    """Rank 0 notes the run dir for the launcher (nothing when no launcher asked for it)."""
    note = os.environ.get(RUN_DIR_NOTE)
    if note and os.environ.get("RANK", "0") == "0":
        Path(note).write_text(str(path))
