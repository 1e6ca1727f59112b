"""Watching a long run: plain progress lines in a log file, TensorBoard events beside metrics.jsonl."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from helpers import quiet_context, synthetic_dataset, tiny_config
from rich.console import Console
from rich.progress import Progress

from maskkit.consoles import user_console
from maskkit.engine.run import _execute, build_models
from maskkit.errors import ConfigError
from maskkit.progress import PlainProgress, progress_display
from maskkit.tensorboard_log import TensorBoardMirror, require_tensorboard


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_terminal_gets_the_live_bar_and_a_file_gets_plain_lines() -> None:
    assert isinstance(progress_display(Console(file=io.StringIO(), force_terminal=True)), Progress)
    assert isinstance(progress_display(Console(file=io.StringIO())), PlainProgress)


def test_plain_progress_prints_whole_lines_every_so_often() -> None:
    out = io.StringIO()
    clock = FakeClock()
    progress = PlainProgress(Console(file=out, width=80), interval=30.0, clock=clock)
    with progress:
        task = progress.add_task("MLO pretrain", total=400, completed=0, status="")
        for step in range(1, 401):
            clock.now = step * 1.0  # one second per step
            progress.advance(task)
            if step % 50 == 0:
                progress.update(task, status=f"pretrain {1 / step:.4f}  130 img/s")
    lines = out.getvalue().splitlines()
    # The first step, then one line per 30 s, then the last step once the block ends.
    assert lines[0] == "MLO pretrain 1/400 (0%) elapsed 0:00:01 eta 0:06:39"
    assert lines[1].startswith("MLO pretrain 31/400 (8%) elapsed 0:00:31 eta 0:06:09")
    assert len(lines) == 1 + 13 + 1
    assert lines[-1] == "MLO pretrain 400/400 (100%) elapsed 0:06:40 eta 0:00:00  pretrain 0.0025  130 img/s"
    assert len(lines[-1]) > 80  # never wrapped at the console's width


def test_plain_progress_of_a_resumed_stage_counts_from_where_it_resumed() -> None:
    out = io.StringIO()
    clock = FakeClock()
    progress = PlainProgress(Console(file=out), interval=30.0, clock=clock)
    with progress:
        task = progress.add_task("fine-tune", total=100, completed=60, status="")
        clock.now = 4.0
        progress.advance(task, 4)
    assert out.getvalue().splitlines()[0] == "fine-tune 64/100 (64%) elapsed 0:00:04 eta 0:00:36"


def test_a_run_written_to_a_file_shows_plain_progress_lines(tmp_path: Path) -> None:
    out = io.StringIO()
    config = tiny_config("mlo-light")
    dataset = synthetic_dataset()
    context = quiet_context(config, dataset, tmp_path / "run")
    context.console = Console(file=out, width=80)
    _execute(context, *build_models(config, dataset.num_classes, context.device), resume=None)
    lines = out.getvalue().splitlines()
    pretrain = [line for line in lines if line.startswith("MLO pretrain ")]
    assert pretrain[0].startswith("MLO pretrain 1/4 (25%)")
    assert pretrain[-1].startswith("MLO pretrain 4/4 (100%)") and "img/s" in pretrain[-1]
    assert any(line.startswith("fine-tune ") for line in lines)
    progress_lines = [line for line in lines if "MLO pretrain" in line or "fine-tune" in line]
    assert not any("━" in line for line in progress_lines)  # no bar drawn into a log file


def test_plain_progress_takes_a_completed_count_and_prints_the_last_line() -> None:
    out = io.StringIO()
    clock = FakeClock()
    with PlainProgress(Console(file=out), interval=30.0, clock=clock) as progress:
        task = progress.add_task("otsu priors, train", total=50, status="")
        clock.now = 2.0
        progress.update(task, completed=50)  # e.g. the maps were already in the store
    assert out.getvalue().splitlines() == ["otsu priors, train 50/50 (100%) elapsed 0:00:02 eta 0:00:00"]


def test_a_priors_build_written_to_a_file_shows_plain_progress_lines(tmp_path: Path) -> None:
    from maskkit.engine.priors import PriorSpec, attach_priors

    out = io.StringIO()
    dataset = synthetic_dataset()
    spec = PriorSpec("center", dataset=dataset.name, image_size=8, store_dir=tmp_path / "store", build=True)
    attached = attach_priors(dataset, spec, Console(file=out, width=80))
    assert attached.train.priors["importance"].shape == (32, 8, 8)
    lines = out.getvalue().splitlines()
    for split, count in (("train", 32), ("val", 16), ("test", 16)):
        assert f"center priors, {split} {count}/{count} (100%)" in "\n".join(lines), lines
    assert not any("━" in line for line in lines)  # no bar drawn into a log file


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_mirrors_every_numeric_metric_per_stage(tmp_path: Path) -> None:
    config = tiny_config("mlo-light", tensorboard=True)
    dataset = synthetic_dataset()
    context = quiet_context(config, dataset, tmp_path / "run")
    _execute(context, *build_models(config, dataset.num_classes, context.device), resume=None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    pretrain = _scalars(tmp_path / "run" / "tensorboard" / "pretrain")
    finetune = _scalars(tmp_path / "run" / "tensorboard" / "finetune")
    for record in records:
        scalars = pretrain if record["stage"] == "pretrain" else finetune
        for key, value in record.items():
            if key not in ("stage", "step"):
                assert (record["step"], pytest.approx(value)) in scalars[key], key
    assert {"loss/pretrain", "loss/mask", "mask/prob_masked", "val/accuracy"} <= set(pretrain)
    assert {"train/loss", "val/accuracy"} <= set(finetune)


def test_a_resumed_run_purges_the_events_logged_after_its_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "tensorboard"
    first = TensorBoardMirror(folder)
    for step in range(1, 7):
        first.write({"stage": "pretrain", "step": step, "loss/pretrain": float(step)})
    first.close()
    resumed = TensorBoardMirror(folder, resume_position=("pretrain", 4))
    for step in range(5, 9):
        resumed.write({"stage": "pretrain", "step": step, "loss/pretrain": 10.0 + step})
    resumed.close()
    steps = _scalars(folder / "pretrain")["loss/pretrain"]
    assert steps == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 15.0), (6, 16.0), (7, 17.0), (8, 18.0)]


def test_tensorboard_off_writes_no_events(tmp_path: Path) -> None:
    config = tiny_config("random")
    assert config.tensorboard is False  # off by default
    dataset = synthetic_dataset()
    context = quiet_context(config, dataset, tmp_path / "run")
    _execute(context, *build_models(config, dataset.num_classes, context.device), resume=None)
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_tensorboard_without_the_package_is_a_one_line_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ModuleNotFoundError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match=r'pip install "maskkit\[tensorboard\]"'):
        require_tensorboard()


STATUS = "pretrain 0.7400  finetune 1.7348  mask 1.7367  p(masked) 0.58  46 img/s  val acc 0.395"


def _live_bar(width: int) -> str:
    """The live bar of a stage at step 120 of 400, as a terminal ``width`` columns wide shows it."""
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=True, color_system=None)
    progress = progress_display(console)
    task = progress.add_task("MLO pretrain", total=400, completed=0, status=STATUS)
    progress.update(task, completed=120)
    console.print(progress.make_tasks_table(progress.tasks))
    return out.getvalue()


@pytest.mark.parametrize(("width", "status_fits"), [(80, False), (100, False), (250, True)])
def test_the_live_bar_keeps_the_stage_step_and_eta_and_cuts_the_status(width: int, status_fits: bool) -> None:
    (line,) = _live_bar(width).splitlines()
    assert line.startswith("MLO pretrain ") and " 120/400 " in line
    assert re.search(r" \d:\d\d:\d\d eta (-:--:--|\d:\d\d:\d\d) ", line), line  # elapsed and ETA, whole
    assert len(line) <= width
    assert "pretrain 0.7400" in line  # the status starts, and gives way where it must
    assert (STATUS in line) == status_fits and line.rstrip().endswith("…") != status_fits


def test_the_user_console_logs_without_source_links_and_does_not_wrap_in_a_file() -> None:
    out = io.StringIO()
    console = user_console(file=out, width=80)
    path = "/work/runs/" + "20261206-0501-semantic-soft-dermamnist/" * 3 + "plots/masks_pretrained.png"
    console.log("step 4: level-2 val accuracy 0.5000")
    console.print(f"saved {path} (8 test images)")
    lines = out.getvalue().splitlines()
    assert lines[0].rstrip().endswith("step 4: level-2 val accuracy 0.5000")  # a time stamp, then the text
    assert ".py:" not in out.getvalue()  # no link to the line of maskkit that logged it
    assert lines[1:] == [f"saved {path} (8 test images)"]  # one line, however long
    terminal = io.StringIO()
    user_console(file=terminal, width=40, force_terminal=True, color_system=None).print("word " * 20)
    assert len(terminal.getvalue().splitlines()) > 1  # a terminal still wraps at its width


def test_the_cli_prints_through_the_user_console(capsys) -> None:
    from maskkit.cli import console

    console.log("step 4: level-2 val accuracy 0.5000")
    assert ".py:" not in capsys.readouterr().out
    assert console.soft_wrap == (not console.is_terminal)
