"""``--logger``: metrics.csv, TensorBoard, Weights & Biases and MLflow behind one interface.

W&B runs in its offline mode and MLflow against a local file store, both under ``tmp_path``: the
tests reach no server. Each skips when its package is not installed (``maskkit[wandb]``,
``maskkit[mlflow]``).
"""

from __future__ import annotations

import csv
import io
import os
import sys
from pathlib import Path

import pytest
from helpers import quiet_context, synthetic_dataset, tiny_config

import maskkit.rundir
from maskkit.cli import main
from maskkit.config import build_config
from maskkit.engine.run import _execute, build_models
from maskkit.errors import ConfigError
from maskkit.loggers import logger_names, open_loggers, require_loggers
from maskkit.loggers.csv_log import CsvLogger, records_to_csv
from maskkit.loggers.state import read_logger_ids
from maskkit.rundir import RunDir

RECORDS = [
    {"stage": "pretrain", "step": 1, "loss/pretrain": 0.9, "lr/pretrain": 1e-3},
    {"stage": "pretrain", "step": 1, "val/accuracy": 0.25, "val/majority_rate": 0.5},
    {"stage": "pretrain", "step": 2, "loss/pretrain": 0.7, "lr/pretrain": 5e-4},
    {"stage": "finetune", "step": 3, "train/loss": 1.5, "epoch": 1, "note": "a, b"},
]


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_the_csv_has_one_column_per_key_any_record_has() -> None:
    text = records_to_csv(RECORDS)
    header = text.splitlines()[0].split(",")
    assert header == ["stage", "step", "loss/pretrain", "lr/pretrain", "val/accuracy", "val/majority_rate",
                      "train/loss", "epoch", "note"]  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 4 and rows[1]["loss/pretrain"] == "" and rows[1]["val/accuracy"] == "0.25"
    assert rows[3]["note"] == "a, b"  # quoted, so the comma stays in its cell


def test_the_csv_logger_writes_whole_tables_and_a_crash_leaves_the_last_one(tmp_path, monkeypatch) -> None:
    run = RunDir.create(tmp_path / "run", "random", "dermamnist")
    clock = iter(range(0, 1000, 4)).__next__  # four seconds pass between two calls
    logger = CsvLogger(run, clock=clock)
    for record in RECORDS[:2]:
        run.log(record)
        logger.write(record)
    assert len(_rows(run.path / "metrics.csv")) == 1  # the first at once, then every 10 s

    def crash(*_):
        raise OSError("disk full")

    monkeypatch.setattr(maskkit.rundir.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        logger.close()
    assert len(_rows(run.path / "metrics.csv")) == 1  # the last whole table, no half-written row
    assert sorted(p.name for p in run.path.iterdir()) == ["metrics.csv", "metrics.jsonl"]  # no temporary
    monkeypatch.undo()
    logger.close()
    assert [row["step"] for row in _rows(run.path / "metrics.csv")] == ["1", "1"]
    resumed = CsvLogger(run)  # a resumed run: the records metrics.jsonl kept come first
    resumed.write(RECORDS[2])
    resumed.close()
    assert [row["step"] for row in _rows(run.path / "metrics.csv")] == ["1", "1", "2"]


def test_a_run_with_the_csv_logger_writes_every_record_to_metrics_csv(tmp_path) -> None:
    config = tiny_config("random", loggers=["csv"])
    dataset = synthetic_dataset()
    context = quiet_context(config, dataset, tmp_path / "run")
    _execute(context, *build_models(config, dataset.num_classes, context.device), resume=None)
    records = context.run.read_metrics()
    rows = _rows(tmp_path / "run" / "metrics.csv")
    assert len(rows) == len(records) > 4
    assert [row["stage"] for row in rows] == [record["stage"] for record in records]
    assert float(rows[0]["loss/pretrain"]) == pytest.approx(records[0]["loss/pretrain"])


def test_the_old_tensorboard_key_is_a_logger_and_names_are_checked() -> None:
    assert logger_names(build_config("smoke", overrides=[{"tensorboard": True}])) == ["tensorboard"]
    both = build_config("smoke", overrides=[{"tensorboard": True, "loggers": ["csv", "tensorboard", "csv"]}])
    assert logger_names(both) == ["csv", "tensorboard"]
    with pytest.raises(ConfigError, match=r"loggers\.0: Input should be 'csv', 'tensorboard', 'wandb' or"):
        build_config("smoke", overrides=[{"loggers": ["cvs"]}])


def test_only_the_process_that_writes_the_run_dir_logs(tmp_path) -> None:
    config = build_config("smoke", overrides=[{"loggers": ["csv"]}])
    run = RunDir.create(tmp_path / "run", "random", "dermamnist")
    run.log(RECORDS[0])
    assert open_loggers(config, RunDir(run.path, writer=False), None) == []  # ranks 1, 2, …
    assert not (run.path / "metrics.csv").exists()
    (logger,) = open_loggers(config, run, None)  # rank 0
    logger.close()
    assert len(_rows(run.path / "metrics.csv")) == 1


def _user_error(monkeypatch, capsys, *args: object) -> str:
    monkeypatch.setattr(sys, "argv", ["maskkit", *map(str, args)])
    with pytest.raises(SystemExit) as ended:
        main()
    captured = capsys.readouterr()
    assert ended.value.code == 2, captured.err + captured.out
    assert "Traceback" not in captured.err and captured.err.count("error:") == 1
    return " ".join(captured.err.split())


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_missing_extra_is_one_line_naming_the_install(name, monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed: find_spec gives None
    with pytest.raises(ConfigError, match=rf'pip install "maskkit\[{name}\]"'):
        require_loggers(build_config("smoke", overrides=[{"loggers": ["csv", name]}]))
    message = _user_error(
        monkeypatch, capsys, "train", "--preset", "smoke", "--logger", f"csv,{name}",
        "--data-dir", tmp_path, "--run-dir", tmp_path / "run",
    )  # fmt: skip
    assert message == (
        f'error: --logger {name} needs the {name} package: pip install "maskkit[{name}]" '
        f'(uv: uv pip install "maskkit[{name}]"), or leave {name} out of --logger'
    )
    assert not (tmp_path / "run").exists()


def test_weights_and_biases_offline(tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    from maskkit.loggers.wandb_log import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    config = build_config("smoke", overrides=[{"policy": "random"}])
    run = RunDir.create(tmp_path / "run", "random", "dermamnist")
    logger = WandbLogger(run, config, None)
    for record in RECORDS:
        logger.write(record)
    assert logger.run.summary["loss/pretrain"] == pytest.approx(0.7)
    assert logger.run.summary["step"] == 3 and logger.run.config["policy"] == "random"
    run_id = logger.run.id
    logger.close()
    (offline,) = (run.path / "wandb").glob(f"offline-run-*-{run_id}")
    assert list(offline.glob("*.wandb"))  # the log W&B syncs later (`wandb sync`)
    assert read_logger_ids(run.path) == {"wandb": run_id}
    resumed = WandbLogger(run, config, ("pretrain", 2))  # maskkit train --resume: the same W&B run
    assert resumed.run.id == run_id
    resumed.close()


def test_mlflow_with_a_local_file_store(tmp_path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from maskkit.loggers.mlflow_log import MlflowLogger

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 prefers a database store
    config = build_config("smoke", overrides=[{"policy": "random"}])
    run = RunDir.create(tmp_path / "run", "random", "dermamnist")
    (run.path / "config.yaml").write_text("policy: random\n")
    logger = MlflowLogger(run, config, None)
    for record in RECORDS:
        logger.write(record)
    logger.close()
    client = MlflowClient()
    run_id = read_logger_ids(run.path)["mlflow"]
    history = client.get_metric_history(run_id, "loss/pretrain")
    assert [(m.step, m.value) for m in history] == [(1, 0.9), (2, 0.7)]
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [3]
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED" and finished.info.run_name == "run"
    assert [artifact.path for artifact in client.list_artifacts(run_id)] == ["config.yaml"]
    resumed = MlflowLogger(run, config, ("pretrain", 1))  # maskkit train --resume: the same MLflow run
    assert resumed.run_id == run_id and client.get_run(run_id).info.status == "RUNNING"
    resumed.close()
    assert os.listdir(tmp_path / "mlruns")  # nothing went anywhere but the local store
