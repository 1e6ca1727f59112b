"""TensorBoard event files beside ``metrics.jsonl``, to watch a long run live (optional).

With ``tensorboard: true`` in the config (``--set tensorboard=true``), every record the run
appends to ``metrics.jsonl`` is also written as TensorBoard scalars under
``RUN_DIR/tensorboard/<stage>/`` (``pretrain``, ``finetune``), each key a tag (``loss/pretrain``,
``mask/prob_masked``, ``val/accuracy``, ...) at the record's step. TensorBoard shows the two
stages as two runs, so ``val/accuracy`` of both lands in one chart::

    tensorboard --logdir runs/

It needs the ``tensorboard`` package (``pip install "maskkit[tensorboard]"``), which is why it is
off by default. A resumed run purges the events logged after its checkpoint, as it does with
``metrics.jsonl``.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

from maskkit.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
# Seconds between flushes to disk: what "live" means here.
FLUSH_SECONDS = 10


def require_tensorboard() -> None:
    """Fail early, before a run dir exists, when ``tensorboard: true`` cannot be honoured."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(
            'tensorboard: true needs the tensorboard package: pip install "maskkit[tensorboard]" '
            "(or pip install tensorboard), or drop --set tensorboard=true"
        ) from None


class TensorBoardMirror:
    """Writes each metrics record as scalars, one event folder per stage.

    Args:
        folder: ``RUN_DIR/tensorboard``.
        resume_position: ``(stage, step)`` of the checkpoint a resumed run starts from, or None.
            That stage's events after ``step`` are purged (TensorBoard's ``purge_step``).
    """

    def __init__(self, folder: Path, resume_position: tuple[str, int] | None = None) -> None:
        self.folder = Path(folder)
        self.resume_position = resume_position
        self.writers: dict[str, Any] = {}

    def _writer(self, stage: str) -> Any:
        if stage not in self.writers:
            from torch.utils.tensorboard import SummaryWriter

            purge_step = None
            if self.resume_position is not None and self.resume_position[0] == stage:
                purge_step = self.resume_position[1] + 1
            self.writers[stage] = SummaryWriter(
                str(self.folder / stage), purge_step=purge_step, flush_secs=FLUSH_SECONDS
            )
        return self.writers[stage]

    def write(self, record: dict[str, Any]) -> None:
        """Every numeric value of ``record`` (``stage`` and ``step`` aside) as a scalar."""
        writer = self._writer(str(record.get("stage", "run")))
        step = int(record.get("step", 0))
        for key, value in record.items():
            if key in ("stage", "step") or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            writer.add_scalar(key, float(value), global_step=step)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
