"""What the command line needs to know about torchrun before torch is imported.

:mod:`maskkit.distributed` imports torch; ``maskkit --help`` must not. The few names the CLI
reads at start-up (the collective timeout's default, whether this process is a torchrun worker,
the failure of a collective) live here, and :mod:`maskkit.distributed` re-exports them.
"""

from __future__ import annotations

import os

#: Seconds a collective waits for the other processes before the run stops (``--collective-timeout``).
DEFAULT_TIMEOUT_S = 600.0

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class CollectiveFailure(RuntimeError):
    """A collective could not complete: another process died, raised an error, or did not answer
    within the collective timeout. The process that hit it stops; torchrun stops the others."""


def launched_by_torchrun() -> bool:
    """Whether this process is a worker that torchrun started (its rank variables are set)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)
