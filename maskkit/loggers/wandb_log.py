"""``--logger wandb``: every record as a Weights & Biases log entry (``pip install "maskkit[wandb]"``).

The W&B run is named after the run dir, holds the run's config, and keeps its files under
``RUN_DIR/wandb/``. Where it goes is W&B's own business: ``wandb login`` for the cloud,
``WANDB_MODE=offline`` to keep it on disk (``wandb sync`` uploads it later), ``WANDB_PROJECT``
for the project (default ``maskkit``). Charts are drawn against the record's ``step`` (W&B's
``define_metric``), so a resumed run, which continues the same W&B run (its id is kept in
``RUN_DIR/loggers.json``), logs from its checkpoint's step on.
"""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING, Any

from maskkit.loggers.numeric import numeric_metrics
from maskkit.loggers.state import read_logger_ids, save_logger_id

if TYPE_CHECKING:
    from maskkit.config import RunConfig
    from maskkit.rundir import RunDir

NAME = "wandb"
DEFAULT_PROJECT = "maskkit"


class WandbLogger:
    """One W&B run per run dir; ``write`` logs a record's numbers with its stage and step."""

    def __init__(self, run: RunDir, config: RunConfig, resume_position: tuple[str, int] | None) -> None:
        import wandb

        run_id = read_logger_ids(run.path).get(NAME) or uuid.uuid4().hex[:8]  # W&B's id format
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT),
            name=run.path.name,
            id=run_id,
            resume="allow",
            dir=str(run.path),
            config=config.model_dump(mode="json"),
            # maskkit's own output stays as it is: no capture of the terminal, no banner.
            settings=wandb.Settings(console="off", silent=True, disable_git=True),
        )
        save_logger_id(run.path, NAME, run_id)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def write(self, record: dict[str, Any]) -> None:
        metrics: dict[str, Any] = numeric_metrics(record)
        if metrics:
            self.run.log({**metrics, "step": int(record.get("step", 0))})

    def close(self) -> None:
        self.run.finish()
