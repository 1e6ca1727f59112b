"""``--logger tensorboard`` (or the old ``tensorboard: true``): :mod:`maskkit.tensorboard_log`'s
events under ``RUN_DIR/tensorboard/<stage>/``, behind the loggers' interface."""

from __future__ import annotations

from typing import TYPE_CHECKING

from maskkit.tensorboard_log import TENSORBOARD_DIR, TensorBoardMirror

if TYPE_CHECKING:
    from maskkit.config import RunConfig
    from maskkit.rundir import RunDir


class TensorBoardLogger(TensorBoardMirror):
    """TensorBoard events of every record; a resumed run purges those after its checkpoint."""

    def __init__(self, run: RunDir, config: RunConfig, resume_position: tuple[str, int] | None) -> None:
        super().__init__(run.path / TENSORBOARD_DIR, resume_position)
