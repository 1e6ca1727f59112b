"""Interrupted, diverging and concurrent runs: finished work is never lost."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import MASKKIT, assert_user_error, last_checkpoint_step, maskkit
from helpers import write_medmnist_npz

from maskkit.cache import cached_tensors
from maskkit.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from maskkit.rundir import RunDir

RUN_OPTIONS = [
    "--policy", "mlo", "--dataset", "dermamnist", "--preset", "smoke",
    "--set", "pretrain.steps=24", "--set", "pretrain.checkpoint_every=4", "--set", "pretrain.eval_every=8",
    "--set", "finetune.epochs=6",
]  # fmt: skip
UNTIMED = ("time", "images_per_s")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_medmnist_npz(folder / "dermamnist.npz", sizes=(96, 32, 32))
    return folder


def _start(run_args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [*MASKKIT, *map(str, run_args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "120"},
    )


def _kill_when(process: subprocess.Popen, run_dir: Path, min_step: int, timeout: float = 300) -> int:
    """SIGKILL ``process`` as soon as its last checkpoint reaches ``min_step``; return that step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step = last_checkpoint_step(run_dir)
        if step >= min_step:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return step
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"no checkpoint at step {min_step} within {timeout} s")


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in UNTIMED} for line in lines]


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_result(data_dir, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    result = maskkit("train", *RUN_OPTIONS, "--data-dir", data_dir, "--run-dir", straight)
    assert result.returncode == 0, result.stderr

    process = _start(["train", *RUN_OPTIONS, "--data-dir", data_dir, "--run-dir", interrupted])
    killed_at = _kill_when(process, interrupted, min_step=8)
    assert killed_at < 24, "the first kill should land in stage 1 (pretraining)"
    assert not (interrupted / "summary.json").exists()

    process = _start(["train", "--resume", interrupted])
    killed_at = _kill_when(process, interrupted, min_step=24 + 3)  # a stage-2 checkpoint
    assert not (interrupted / "summary.json").exists()

    result = maskkit("train", "--resume", interrupted)
    assert result.returncode == 0, result.stderr
    expected = json.loads((straight / "summary.json").read_text())
    resumed = json.loads((interrupted / "summary.json").read_text())
    assert resumed["test"] == expected["test"]  # bit-equal metrics, confusion matrix included
    assert resumed["pretrain"]["level_steps"] == expected["pretrain"]["level_steps"]
    assert resumed["pretrain"]["evaluations"] == expected["pretrain"]["evaluations"]
    assert _records(interrupted) == _records(straight)


@pytest.mark.slow
def test_kill_during_checkpoint_writes_leaves_a_loadable_checkpoint(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    options = [*RUN_OPTIONS, "--set", "pretrain.checkpoint_every=1", "--data-dir", data_dir]
    process = _start(["train", *options, "--run-dir", run_dir])
    for min_step in (2, 5):
        _kill_when(process, run_dir, min_step=min_step)
        checkpoint = load_checkpoint(run_dir / "checkpoints", "last")
        assert checkpoint.state["step"] == last_checkpoint_step(run_dir)
        assert {"mae", "policy", "head"} <= set(checkpoint.weights)
        process = _start(["train", "--resume", run_dir])
    assert process.wait(timeout=600) == 0
    assert (run_dir / "summary.json").exists()


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    module = torch.nn.Linear(2, 2)
    directory = tmp_path / "checkpoints"
    save_checkpoint(directory, 1, {"model": module}, {"step": 1})

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("maskkit.checkpoint.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(directory, 2, {"model": module}, {"step": 2})
    assert load_checkpoint(directory).state == {"step": 1}
    assert sorted(path.name for path in directory.iterdir()) == ["last.json", "step-000000001"]


@pytest.mark.slow
def test_divergence_stops_with_the_level_and_step_and_keeps_the_checkpoint(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = maskkit(
        "train", *RUN_OPTIONS, "--data-dir", data_dir, "--run-dir", run_dir,
        "--set", "pretrain.checkpoint_every=1", "--set", "pretrain.mae.lr=1e30",
    )  # fmt: skip
    assert_user_error(result, "pretrain level diverged at its step", "pretrain.mae.lr=", "fp32", str(run_dir))
    assert checkpoint_path(run_dir / "checkpoints", "last") is not None
    load_checkpoint(run_dir / "checkpoints", "last")


def test_unknown_dataset_lists_the_available_ones(data_dir):
    result = maskkit("train", "--dataset", "imagenet", "--data-dir", data_dir)
    assert_user_error(result, "imagenet", "dermamnist", "cifar10", "imagefolder")


def test_wrong_shape_npz(tmp_path):
    import numpy as np

    arrays = {f"{split}_images": np.zeros((4, 5), np.uint8) for split in ("train", "val", "test")}
    arrays |= {f"{split}_labels": np.zeros((4, 1), np.uint8) for split in ("train", "val", "test")}
    np.savez(tmp_path / "dermamnist.npz", **arrays)
    assert_user_error(maskkit("train", "--preset", "smoke", "--data-dir", tmp_path), "dermamnist.npz")


def test_empty_image_folder(tmp_path):
    (tmp_path / "train").mkdir()
    result = maskkit("train", "--preset", "smoke", "--dataset", "imagefolder", "--data-dir", tmp_path)
    assert_user_error(result, str(tmp_path))


def test_resume_of_a_folder_that_is_no_run(tmp_path):
    assert_user_error(maskkit("train", "--resume", tmp_path), "not a maskkit run directory")


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(path): path.stat().st_mtime_ns for path in folder.rglob("*")}


@pytest.mark.slow
def test_resume_refuses_a_different_config_and_writes_nothing(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    process = _start(["train", *RUN_OPTIONS, "--data-dir", data_dir, "--run-dir", run_dir])
    _kill_when(process, run_dir, min_step=4)
    before = _snapshot(run_dir)
    result = maskkit("train", "--resume", run_dir, "--policy", "random")
    assert_user_error(result, "policy (saved 'mlo', given 'random')", "start a new run")
    result = maskkit("train", "--resume", run_dir, "--set", "pretrain.mask.lr=1")
    assert_user_error(result, "pretrain.mask.lr")
    assert _snapshot(run_dir) == before


def test_an_existing_run_dir_is_never_written_into(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("finished work")
    before = _snapshot(run_dir)
    result = maskkit("train", "--preset", "smoke", "--data-dir", data_dir, "--run-dir", run_dir)
    assert_user_error(result, "already holds files", "--resume")
    assert _snapshot(run_dir) == before


def _create_run_dir(root: str, queue) -> None:
    queue.put(str(RunDir.create(None, "mlo", "dermamnist", root=Path(root)).path))


def test_concurrent_runs_get_their_own_directories(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_create_run_dir, args=(str(tmp_path), queue)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    paths = [queue.get(timeout=5) for _ in workers]
    assert len(set(paths)) == 4
    assert all(Path(path).is_dir() for path in paths)


def _build_cache(path: str, marker_dir: str) -> None:
    def build():
        (Path(marker_dir) / f"built-{os.getpid()}").touch()
        time.sleep(0.5)  # a slow build, so the two builders overlap
        return {"heatmap": torch.arange(12.0).reshape(3, 4)}

    cached_tensors(Path(path), build)


def test_building_a_cache_twice_at_once_leaves_one_valid_cache(tmp_path):
    cache, markers = tmp_path / "priors" / "heatmap.safetensors", tmp_path / "markers"
    markers.mkdir()
    context = multiprocessing.get_context("spawn")
    builders = [context.Process(target=_build_cache, args=(str(cache), str(markers))) for _ in range(2)]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join(60)
        assert builder.exitcode == 0
    assert len(list(markers.iterdir())) == 1  # built once; the other waited and loaded it
    loaded = cached_tensors(cache, lambda: pytest.fail("the cache should not be rebuilt"))
    assert torch.equal(loaded["heatmap"], torch.arange(12.0).reshape(3, 4))
    assert [path.name for path in cache.parent.iterdir() if path.suffix == ".tmp"] == []


def test_a_corrupt_cache_is_rebuilt(tmp_path):
    cache = tmp_path / "heatmap.safetensors"
    cache.write_bytes(b"not a safetensors file")
    loaded = cached_tensors(cache, lambda: {"heatmap": torch.ones(2)})
    assert torch.equal(loaded["heatmap"], torch.ones(2))
    assert torch.equal(cached_tensors(cache, lambda: {})["heatmap"], torch.ones(2))


def test_sigint_points_at_resume(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [*MASKKIT, "train", *RUN_OPTIONS, "--data-dir", str(data_dir), "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        # A shell's background job inherits SIGINT ignored, and Python then never raises
        # KeyboardInterrupt: give the run the default disposition, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    _wait_for(lambda: last_checkpoint_step(run_dir) >= 4)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "--resume" in stdout + stderr and "Traceback" not in stderr


def _wait_for(condition, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_discarding_an_unstarted_run_removes_only_what_maskkit_made(tmp_path):
    created = RunDir.create(None, "mlo", "dermamnist", root=tmp_path / "runs")
    created.config_path.write_text("policy: mlo\n")
    created.log({"stage": "pretrain", "step": 1})
    assert created.discard_unstarted() and not created.path.exists()
    assert (tmp_path / "runs").is_dir()  # the runs root may hold other runs: never removed

    empty = tmp_path / "mine"
    empty.mkdir()
    given = RunDir.create(empty, "mlo", "dermamnist")
    given.config_path.write_text("policy: mlo\n")
    (given.plots).mkdir()
    assert given.discard_unstarted() and empty.is_dir() and not any(empty.iterdir())

    started = RunDir.create(tmp_path / "started", "mlo", "dermamnist")
    started.config_path.write_text("policy: mlo\n")
    save_checkpoint(started.checkpoints, 1, {"model": torch.nn.Linear(2, 2)}, {"step": 1})
    assert not started.discard_unstarted()
    assert started.config_path.is_file() and checkpoint_path(started.checkpoints, "last") is not None

    # The view the other processes of a multi-process run hold never removes anything: rank 0 does.
    follower_dir = RunDir.create(tmp_path / "follower", "mlo", "dermamnist")
    follower_dir.config_path.write_text("policy: mlo\n")
    follower = RunDir(follower_dir.path, writer=False)
    follower.created_here = True
    assert not follower.discard_unstarted() and follower.config_path.is_file()
