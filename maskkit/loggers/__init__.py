"""Where a run's metrics go besides ``metrics.jsonl``: the loggers of ``--logger``.

Each logger is a small module behind one interface, :class:`~maskkit.rundir.MetricsMirror`
(``write(record)`` for every record the run appends to ``metrics.jsonl``, ``close()`` at the
end), and is named in the config's ``loggers`` list (``--logger csv,wandb``):

- ``csv``: ``RUN_DIR/metrics.csv``, a table a spreadsheet opens (needs nothing);
- ``tensorboard``: events under ``RUN_DIR/tensorboard/<stage>/`` (``maskkit[tensorboard]``);
- ``wandb``: a Weights & Biases run; ``WANDB_MODE=offline`` keeps it on disk (``maskkit[wandb]``);
- ``mlflow``: an MLflow run at ``MLFLOW_TRACKING_URI`` (``maskkit[mlflow]``).

The old key ``tensorboard: true`` still works: it adds ``tensorboard`` to the list. A missing
package stops the run before its run dir exists, with the ``pip install`` line that adds it.
Only the process that writes the run dir logs (rank 0 of a multi-process run).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from maskkit.errors import ConfigError

if TYPE_CHECKING:
    from maskkit.config import RunConfig
    from maskkit.rundir import MetricsMirror, RunDir


@dataclass(frozen=True)
class LoggerEntry:
    """A logger: the package it needs (None: nothing), and where its class is."""

    package: str | None
    module: str
    class_name: str


LOGGERS: dict[str, LoggerEntry] = {
    "csv": LoggerEntry(None, "maskkit.loggers.csv_log", "CsvLogger"),
    "tensorboard": LoggerEntry("tensorboard", "maskkit.loggers.tensorboard_logger", "TensorBoardLogger"),
    "wandb": LoggerEntry("wandb", "maskkit.loggers.wandb_log", "WandbLogger"),
    "mlflow": LoggerEntry("mlflow", "maskkit.loggers.mlflow_log", "MlflowLogger"),
}


def logger_names(config: RunConfig) -> list[str]:
    """The loggers a run uses: ``loggers``, plus ``tensorboard`` for the old ``tensorboard: true``."""
    names = list(dict.fromkeys(config.loggers))
    if config.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return names


def require_loggers(config: RunConfig) -> None:
    """Fail early, before a run dir exists, when a logger's package is not installed."""
    for name in logger_names(config):
        package = LOGGERS[name].package
        if package is not None and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f'--logger {name} needs the {package} package: pip install "maskkit[{name}]" '
                f'(uv: uv pip install "maskkit[{name}]"), or leave {name} out of --logger'
            )


def open_loggers(
    config: RunConfig, run: RunDir, resume_position: tuple[str, int] | None
) -> list[MetricsMirror]:
    """The run's loggers, ready for records; none unless this process writes the run dir."""
    if not run.writer:
        return []
    opened: list[MetricsMirror] = []
    try:
        for name in logger_names(config):
            entry = LOGGERS[name]
            logger_class = getattr(importlib.import_module(entry.module), entry.class_name)
            try:
                opened.append(logger_class(run, config, resume_position))
            except Exception as error:  # the tracker's own settings (a URI, a login): the user's to fix
                problem = " ".join(str(error).split()) or type(error).__name__
                raise ConfigError(
                    f"--logger {name} could not start: {problem} (fix its settings, or leave {name} "
                    "out of --logger)"
                ) from error
    except BaseException:
        for logger in opened:
            logger.close()
        raise
    return opened
