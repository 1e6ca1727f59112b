"""``--logger mlflow``: every record as MLflow metrics (``pip install "maskkit[mlflow]"``).

The tracking server is MLflow's own choice: ``MLFLOW_TRACKING_URI`` (a server, or a local store
such as ``file:///path/to/mlruns``), else MLflow's default. The experiment is
``MLFLOW_EXPERIMENT_NAME`` (default ``maskkit``); the MLflow run is named after the run dir and
holds its ``config.yaml`` as an artifact. A resumed run continues the same MLflow run (its id is
kept in ``RUN_DIR/loggers.json``); MLflow keeps every value logged at a step, so the steps
between the checkpoint and the interruption appear twice.
"""

from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING, Any

from maskkit.loggers.numeric import numeric_metrics
from maskkit.loggers.state import read_logger_ids, save_logger_id

if TYPE_CHECKING:
    from maskkit.config import RunConfig
    from maskkit.rundir import RunDir

NAME = "mlflow"
DEFAULT_EXPERIMENT = "maskkit"
# MLflow's metric names: letters, digits, and _ - . space / (anything else becomes _).
UNSAFE = re.compile(r"[^\w\-. /]")


def metric_name(key: str) -> str:
    """``key`` as MLflow accepts it."""
    return UNSAFE.sub("_", key)


class MlflowLogger:
    """One MLflow run per run dir; ``write`` logs a record's numbers at its step."""

    def __init__(self, run: RunDir, config: RunConfig, resume_position: tuple[str, int] | None) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
        )
        self.run_id = read_logger_ids(run.path).get(NAME)
        if self.run_id is None:
            tags = {"maskkit.run_dir": str(run.path.resolve()), "maskkit.policy": config.policy}
            created = self.client.create_run(experiment_id, run_name=run.path.name, tags=tags)
            self.run_id = created.info.run_id
            save_logger_id(run.path, NAME, self.run_id)
            if run.config_path.is_file():
                self.client.log_artifact(self.run_id, str(run.config_path))
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def write(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step, now = int(record.get("step", 0)), int(time.time() * 1000)
        metrics = [
            Metric(metric_name(key), value, now, step) for key, value in numeric_metrics(record).items()
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
