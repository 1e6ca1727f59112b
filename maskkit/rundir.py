"""The run directory: config, metrics log, summary, checkpoints and plots of one run.

Layout::

    RUN_DIR/
      config.yaml        resolved config
      metrics.jsonl      one JSON record per logged step or epoch
      summary.json       final metrics (written at the end)
      predictions_test.npz  the test labels and class scores (softmax probabilities) the test metrics
                         come from (written just before summary.json; maskkit.report.predictions)
      protocols.json     linear probe and k-NN of the frozen pretrained encoder (``protocols: true``;
                         written just before summary.json)
      checkpoints/       see maskkit.checkpoint
      plots/             PNG figures
      tensorboard/       TensorBoard events of metrics.jsonl (``--logger tensorboard``; see
                         maskkit.tensorboard_log)
      metrics.csv        metrics.jsonl as a table (``--logger csv``; maskkit.loggers.csv_log)
      wandb/             W&B's files (``--logger wandb``); loggers.json: the W&B and MLflow run ids
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

from maskkit.errors import ConfigError, DamagedFileError

#: The files and folders of a run dir, by name (the layout above). Everything that reads or
#: writes a run dir (the engine, ``maskkit bench``, ``evaluate``, ``export``) names them from here.
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
#: The linear probe's and k-NN's results (``protocols: true``; :mod:`maskkit.engine.protocols`).
PROTOCOLS_FILE = "protocols.json"
CHECKPOINTS_DIR = "checkpoints"
PLOTS_DIR = "plots"


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


#: Permissions of the files and folders maskkit writes, whatever tool wrote them (tempfile's
#: 0600/0700, safetensors' own): what ``open()`` and ``mkdir()`` give, 0644 and 0755 under the
#: usual umask 022, so every file of a run reads the same to its owner's group and others.
FILE_MODE = 0o666 & ~_umask()
DIRECTORY_MODE = 0o777 & ~_umask()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    _atomic_write(path, "w", text)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never half-written."""
    _atomic_write(path, "wb", data)


def _atomic_write(path: Path, mode: str, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, FILE_MODE)  # mkstemp makes it 0600
        with os.fdopen(handle, mode) as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _unique_directory(root: Path, stem: str) -> Path:
    """Create ``root/stem`` (or ``stem-2``, ``stem-3`` …) with an exclusive mkdir."""
    root.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 10_000):
        candidate = root / (stem if attempt == 1 else f"{stem}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise ConfigError(f"could not create a fresh run directory under {root}")


class MetricsMirror(Protocol):
    """Something that receives every metrics record as well (e.g. TensorBoard)."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class RunDir:
    """Paths and writers of one run directory.

    ``writer=False`` is the view the other processes of a multi-process run hold: it reads like
    any other, and its writers (:meth:`log`, :meth:`truncate_metrics`, :meth:`write_json`) do
    nothing, because rank 0 alone writes the run dir.
    """

    def __init__(self, path: Path, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer
        # Set by create(): whether this process made the folder (else it was an empty --run-dir).
        self.created_here = False
        self.mirrors: list[MetricsMirror] = []

    @classmethod
    def create(cls, run_dir: Path | None, policy: str, dataset: str, root: Path = Path("runs")) -> RunDir:
        """A new run dir: ``run_dir`` if given (it must be empty or absent), else
        ``root/<time>-<policy>-<dataset>``. Two runs never share a directory."""
        if run_dir is None:
            stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{policy}-{dataset}"
            run = cls(_unique_directory(root, stem))
            run.created_here = True
            return run
        run_dir = Path(run_dir)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(
                f"run dir {run_dir} already holds files; pick a new --run-dir, "
                f"or continue it with --resume {run_dir}"
            )
        run = cls(run_dir)
        run.created_here = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        return run

    def has_checkpoints(self) -> bool:
        """Whether anything was ever saved under ``checkpoints/``."""
        return self.checkpoints.is_dir() and any(self.checkpoints.iterdir())

    def discard_unstarted(self) -> bool:
        """Undo :meth:`create` for a run that failed before its first checkpoint.

        Removes what maskkit wrote into the folder (config, metrics, plots) and the folder itself
        if :meth:`create` made it, so that the same ``--run-dir`` can be used again. A run dir
        holding checkpoints is never touched, and neither is anything by a process that does not
        write the run dir (``writer=False``). Returns whether anything was removed.
        """
        if not self.writer or self.has_checkpoints() or not self.path.is_dir():
            return False
        if self.created_here:
            shutil.rmtree(self.path)
        else:  # an empty --run-dir the user made: leave it empty, as it was
            for child in self.path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        return True

    @classmethod
    def open(cls, path: Path) -> RunDir:
        """An existing run dir (it must hold ``config.yaml``)."""
        run = cls(path)
        if not run.config_path.is_file():
            raise ConfigError(f"{path} is not a maskkit run directory (no {CONFIG_FILE} in it)")
        return run

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def protocols_path(self) -> Path:
        return self.path / PROTOCOLS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def plots(self) -> Path:
        return self.path / PLOTS_DIR

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to ``metrics.jsonl`` (and hand it to each mirror)."""
        if not self.writer:
            return
        with self.metrics_path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        for mirror in self.mirrors:
            mirror.write(record)

    def close_mirrors(self) -> None:
        for mirror in self.mirrors:
            mirror.close()
        self.mirrors.clear()

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl``, in order.

        A last line without its newline was cut by a crash mid-write and is skipped; bytes that
        are no text, or any other line that is no JSON record, mean the file was damaged since
        (:class:`~maskkit.errors.DamagedFileError`).
        """
        if not self.metrics_path.exists():
            return []
        path = self.metrics_path
        fix = (
            "delete the damaged lines, or the whole file (the run's checkpoints do not depend on it; "
            "the training curves then start where it resumes), and run the command again"
        )
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except UnicodeDecodeError as error:
            raise DamagedFileError(path, f"byte {error.start} is not UTF-8 text", fix) from None
        records = []
        for number, line in enumerate(lines[:-1], start=1):  # each complete line ends in "\n"
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                raise DamagedFileError(path, f"line {number} is not a JSON record", fix)
            records.append(record)
        return records  # lines[-1]: "" after the last newline, or a line cut mid-write

    def truncate_metrics(self, position: tuple[str, int] | None) -> None:
        """Drop the records logged after ``(stage, step)`` (all of them for None): a resumed run
        logs those steps again. Rewritten atomically."""
        if not self.writer:
            return
        order = {"pretrain": 0, "finetune": 1}
        if position is None:
            kept = []
        else:
            stage, step = position
            kept = [
                record
                for record in self.read_metrics()
                if (order.get(record.get("stage"), 2), record.get("step", 0)) <= (order[stage], step)
            ]
        if kept or self.metrics_path.exists():
            atomic_write_text(self.metrics_path, "".join(json.dumps(record) + "\n" for record in kept))

    def write_json(self, name: str, payload: Any) -> Path:
        path = self.path / name
        if not self.writer:
            return path
        atomic_write_text(path, json.dumps(payload, indent=2))
        return path

    def read_json(self, name: str) -> Any:
        """The JSON file ``name`` of the run (``summary.json``, ``protocols.json``, ...); one that
        does not parse raises :class:`~maskkit.errors.DamagedFileError`."""
        path = self.path / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            also = "" if name == SUMMARY_FILE else f" and {SUMMARY_FILE}"
            raise DamagedFileError(
                path,
                f"not JSON: {error}",
                f"delete it{also} and run `maskkit train --resume {self.path}`, which writes it again "
                "from the run's final checkpoint",
            ) from None
