"""Multi-process training: 2 gloo processes on the CPU under torchrun.

- every level's parameters are identical across the processes, and a 2-process run matches a
  1-process run with the same global batch (a defect in the hypergradient's averaging fails it);
- the batches: a process's slice is exactly its part of the single-process batch;
- ``maskkit train --nproc 2``: only rank 0 writes, and its run dir is as complete as a
  single-process run's;
- a process that is killed, raises or hangs ends the job with one message, exit code ≠ 0, and
  the last good checkpoint kept, which resumes on a different number of processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cli_helpers import MASKKIT, assert_user_error, last_checkpoint_step, maskkit
from helpers import write_medmnist_npz

from maskkit.checkpoint import load_checkpoint
from maskkit.data import DeviceBatches, ImageSplit
from maskkit.distributed import check_batch_sizes, local_rows, owned_rows
from maskkit.errors import ConfigError
from maskkit.launch import _failure_message, worker_arguments
from maskkit.report.predictions import read_predictions

TESTS = Path(__file__).resolve().parent
PROCESSES = 2
ENV = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}

# 2 processes against 1, 4 pretrain steps (mask level: 2 or 4 steps). Measured on the 2-core
# CPU, in float32: hypergradients agree to a relative error of at most 1.0e-5, losses to 2.4e-7
# and parameters to 5.9e-5 (Adam turns the reduction-order differences of near-zero gradients
# into steps of that size); in float64: 1.5e-14, 2.2e-16 and 1.7e-13. Averaging the finished
# per-process hypergradients instead gave a relative error of 4.9 (the processes stay identical;
# only this comparison catches it); not averaging the products, the broken case below, 1.5.
# (Bounded logits make a scorer's output bias irrelevant: its gradient is rounding noise, which
# Adam turned into ±lr steps that broke this comparison; the scorers drop that bias.)
TOLERANCES = {  # hypergradient (relative), loss, parameter (absolute)
    "float32": {"hypergradient": 1e-3, "loss": 1e-5, "parameter": 5e-4},
    "float64": {"hypergradient": 1e-10, "loss": 1e-12, "parameter": 1e-10},
}


# --- the equivalence -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("distributed")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={PROCESSES}",
        str(TESTS / "distributed_worker.py"), str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600, cwd=TESTS)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"process{rank}.pt") for rank in range(PROCESSES)]


@pytest.fixture(scope="module")
def one_process_results(tmp_path_factory) -> dict:
    import distributed_worker

    out = tmp_path_factory.mktemp("single")
    names = [name for name in distributed_worker.CASES if name != distributed_worker.BROKEN]
    return {name: distributed_worker.run_case(name, out) for name in names}


def _parameters(result: dict) -> dict[str, torch.Tensor]:
    return {
        f"{level}.{key}": value
        for level, group in result["parameters"].items()
        for key, value in group.items()
    }


def _differences(two: dict, one: dict) -> dict[str, float]:
    """Largest differences of a 2-process run from the 1-process run of its case."""
    parameters_two, parameters_one = _parameters(two), _parameters(one)
    assert parameters_two.keys() == parameters_one.keys()
    assert len(two["hypergradients"]) == len(one["hypergradients"])
    hypergradient = max(
        [
            float((a - b).norm() / b.norm())
            for a, b in zip(two["hypergradients"], one["hypergradients"], strict=True)
        ],
        default=0.0,
    )
    losses = [
        abs(a[level] - b[level])
        for a, b in zip(two["losses"], one["losses"], strict=True)
        for level in a
        if a[level] is not None
    ]
    parameter = max(float((parameters_two[key] - parameters_one[key]).abs().max()) for key in parameters_one)
    return {"hypergradient": hypergradient, "loss": max(losses), "parameter": parameter}


def _within_tolerance(differences: dict[str, float], dtype: str = "float32") -> bool:
    return all(differences[key] <= limit for key, limit in TOLERANCES[dtype].items())


@pytest.mark.slow
def test_every_level_stays_identical_across_processes(two_process_results):
    import distributed_worker

    first, *others = two_process_results
    for name in distributed_worker.CASES:
        if name == distributed_worker.BROKEN:
            continue
        reference = _parameters(first[name])
        assert "pretrain" in first[name]["parameters"]
        for other in others:
            for key, value in _parameters(other[name]).items():
                assert torch.equal(value, reference[key]), f"{name}: {key} differs between processes"
            assert other[name]["losses"] == first[name]["losses"]
            for a, b in zip(other[name]["hypergradients"], first[name]["hypergradients"], strict=True):
                assert torch.equal(a, b)


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(two_process_results, one_process_results):
    import distributed_worker

    for name, one in one_process_results.items():
        if name in ("random",):  # its noise is drawn per process: equal in law only
            continue
        differences = _differences(two_process_results[0][name], one)
        dtype = "float64" if name.endswith(distributed_worker.FLOAT64) else "float32"
        assert _within_tolerance(differences, dtype), f"{name}: {differences}"
        assert len(one["hypergradients"]) >= 2, "the mask level should step more than once"
    broken = _differences(
        two_process_results[0][distributed_worker.BROKEN],
        one_process_results[distributed_worker.FIRST],
    )
    assert not _within_tolerance(broken), f"the comparison missed unaveraged products: {broken}"
    assert broken["hypergradient"] > 100 * TOLERANCES["float32"]["hypergradient"]


# --- dividing the work ------------------------------------------------------------------------
def _split(count: int = 21) -> ImageSplit:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, 12, 12), generator=generator, dtype=torch.uint8)
    return ImageSplit(images=images, labels=torch.arange(count))


@pytest.mark.parametrize("augment, cutout", [("none", 0), ("crop_flip", 4), ("randaugment", 0)])
def test_the_slices_of_the_processes_are_the_single_process_batch(augment, cutout):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    single = DeviceBatches(_split(), 8, "cpu", mean, std, augment=augment, seed=3, cutout=cutout)
    parts = [
        DeviceBatches(
            _split(), 8, "cpu", mean, std, augment=augment, seed=3, cutout=cutout, rank=r, world_size=4
        )
        for r in range(4)
    ]
    for _ in range(6):  # past an epoch boundary (21 images)
        images, labels, _ = single.next()
        slices = [part.next() for part in parts]
        assert all(len(piece[1]) == 2 for piece in slices)
        assert torch.equal(torch.cat([piece[0] for piece in slices]), images)
        assert torch.equal(torch.cat([piece[1] for piece in slices]), labels)
    # The data order is the global one on every process: a resume may use another process count.
    states = [part.state_dict() for part in parts]
    for state in states[1:]:
        assert state["position"] == states[0]["position"] and torch.equal(
            state["permutation"], states[0]["permutation"]
        )
    halves = [
        DeviceBatches(
            _split(), 8, "cpu", mean, std, augment=augment, seed=99, cutout=cutout, rank=r, world_size=2
        )
        for r in range(2)
    ]
    for half in halves:
        half.load_state_dict(states[0])
    images = single.next().images
    assert torch.equal(torch.cat([half.next()[0] for half in halves]), images)


def test_the_priors_ride_along_in_every_process_slice():
    split = _split()
    generator = torch.Generator().manual_seed(1)
    split.priors["otsu"] = torch.randint(0, 256, (len(split), 12, 12), generator=generator, dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    single = DeviceBatches(split, 8, "cpu", mean, std, augment="crop_flip", seed=3, priors=["otsu"])
    parts = [
        DeviceBatches(
            split, 8, "cpu", mean, std, augment="crop_flip", seed=3, priors=["otsu"], rank=r, world_size=2
        )
        for r in range(2)
    ]
    for _ in range(4):
        whole = single.next()
        slices = [part.next() for part in parts]
        assert torch.equal(torch.cat([piece.images for piece in slices]), whole.images)
        assert torch.equal(torch.cat([piece.priors["otsu"] for piece in slices]), whole.priors["otsu"])


def test_uneven_batches_are_refused_with_the_keys_named():
    assert local_rows(12, 1, 3) == slice(4, 8)
    with pytest.raises(ValueError):
        local_rows(10, 0, 3)
    with pytest.raises(ValueError):
        DeviceBatches(_split(), 6, "cpu", (0.5,) * 3, (0.2,) * 3, rank=0, world_size=4)
    check_batch_sizes({"pretrain.mae.batch_size": 6})  # one process: anything goes


def test_evaluation_shares_are_whole_batches_in_order(monkeypatch):
    import maskkit.distributed as distributed

    for count, block, processes in [(10, 4, 2), (3, 4, 2), (100, 8, 3), (0, 4, 2)]:
        shares = []
        for rank in range(processes):
            monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
            monkeypatch.setattr(distributed, "world_size", lambda processes=processes: processes)
            shares.append(owned_rows(count, block))
        assert [row for share in shares for row in share] == list(range(count))
        assert all(share.start % block == 0 for share in shares if len(share))
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    with pytest.raises(ConfigError, match=r"pretrain.mask.batch_size=6 .* multiple of 4"):
        check_batch_sizes({"pretrain.mae.batch_size": 8, "pretrain.mask.batch_size": 6})


def test_the_launcher_passes_the_command_on_without_nproc():
    argv = ["train", "--nproc", "2", "--policy", "mlo", "--nproc=3", "--set", "seed=1"]
    assert worker_arguments(argv) == ["train", "--policy", "mlo", "--set", "seed=1"]


# --- the command line ------------------------------------------------------------------------
# Each process samples the masks of its own slice from its own stream (as random's noise): the
# runs compare number for number under the deterministic top-k, without the random warm-up.
RUN_OPTIONS = [
    "--policy", "mlo", "--dataset", "dermamnist", "--preset", "smoke",
    "--set", "finetune.head_dropout=0",
    "--set", "pretrain.learned_mask.selection=top-k", "--set", "pretrain.learned_mask.random_warmup=0",
]  # fmt: skip
UNTIMED = ("time", "images_per_s")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_medmnist_npz(folder / "dermamnist.npz", sizes=(96, 32, 32))
    return folder


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, data_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "one"
    result = maskkit("train", *RUN_OPTIONS, "--data-dir", data_dir, "--run-dir", run_dir, env=ENV)
    assert result.returncode == 0, result.stderr
    return run_dir


def _files(run_dir: Path) -> list[str]:
    return sorted(str(path.relative_to(run_dir)) for path in run_dir.rglob("*"))


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in UNTIMED} for line in lines]


@pytest.mark.slow
def test_two_processes_write_one_complete_run_dir(data_dir, one_process_run, tmp_path):
    run_dir = tmp_path / "two"
    result = maskkit(
        "train", "--nproc", PROCESSES, *RUN_OPTIONS, "--data-dir", data_dir, "--run-dir", run_dir, env=ENV
    )
    assert result.returncode == 0, result.stderr
    assert "error:" not in result.stderr
    assert _files(run_dir) == _files(one_process_run)  # the same files, and no others
    assert result.stdout.count("maskkit starting run") == 1  # one progress display: rank 0's
    two, one = _records(run_dir), _records(one_process_run)
    assert [(r["stage"], r["step"], sorted(r)) for r in two] == [
        (r["stage"], r["step"], sorted(r)) for r in one
    ]
    for a, b in zip(two, one, strict=True):
        for key, value in b.items():
            if isinstance(value, float) and not key.startswith("lr/"):
                assert a[key] == pytest.approx(value, rel=1e-3, abs=1e-5), (key, a["step"])
    summary, reference = (
        json.loads((path / "summary.json").read_text()) for path in (run_dir, one_process_run)
    )
    assert summary.keys() == reference.keys()
    assert summary["environment"]["processes"] == PROCESSES and reference["environment"]["processes"] == 1
    assert summary["pretrain"]["level_steps"] == reference["pretrain"]["level_steps"]
    assert summary["pretrain"]["evaluation_counts"] == reference["pretrain"]["evaluation_counts"]
    assert summary["test"]["num_samples"] == reference["test"]["num_samples"]
    assert summary["test_accuracy"] == pytest.approx(reference["test_accuracy"], abs=1 / 32 + 1e-9)
    # The test predictions are gathered from both processes in the split's order.
    (two_scores, _), (one_scores, _) = (
        read_predictions(path / "predictions_test.npz") for path in (run_dir, one_process_run)
    )
    assert two_scores.labels.tolist() == one_scores.labels.tolist()
    assert two_scores.scores.shape == one_scores.scores.shape == (summary["test"]["num_samples"], 7)


@pytest.mark.slow
def test_an_uneven_global_batch_is_a_user_error(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = maskkit(
        "train", "--nproc", PROCESSES, *RUN_OPTIONS, "--data-dir", data_dir, "--run-dir", run_dir,
        "--set", "pretrain.mask.batch_size=31", env=ENV,
    )  # fmt: skip
    assert_user_error(result, "pretrain.mask.batch_size=31", "2 processes")
    assert result.stderr.count("error:") == 1
    assert not run_dir.exists()


def _start(*args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*MASKKIT, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**ENV, **(env or {})},
    )


def _worker_pid(launcher: subprocess.Popen, rank: int, timeout: float = 300) -> int:
    """The pid of the worker of ``rank`` that the launcher started (Linux /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                environment = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if parent == launcher.pid and f"RANK={rank}".encode() in environment:
                return int(entry.name)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} within {timeout} s")


def _wait_for_checkpoint(run_dir: Path, launcher: subprocess.Popen, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while last_checkpoint_step(run_dir) < step:
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no checkpoint at step {step} within {timeout} s"
        time.sleep(0.02)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in " ".join(stderr.split()).split("error:")[1:]]


@pytest.mark.slow
def test_a_killed_process_ends_the_job_and_the_run_resumes_on_one_process(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    launcher = _start(
        "train", "--nproc", PROCESSES, *RUN_OPTIONS, "--data-dir", data_dir, "--run-dir", run_dir,
        "--set", "pretrain.steps=24", "--set", "pretrain.checkpoint_every=2",
        "--set", "pretrain.eval_every=8",
    )  # fmt: skip
    victim = _worker_pid(launcher, rank=1)
    _wait_for_checkpoint(run_dir, launcher, step=4)
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = launcher.communicate(timeout=120)
    assert time.monotonic() - killed < 60, "the job outlived its killed process by a minute"
    assert launcher.returncode == 1, stderr
    assert "Traceback" not in stderr
    errors = _error_lines(stderr)
    assert len(errors) == 1, stderr
    for fragment in (
        "process 1 of 2 failed",
        "SIGKILL",
        "last good checkpoint",
        f"--resume {run_dir} --nproc 2",
    ):
        assert fragment in errors[0], errors[0]
    step = last_checkpoint_step(run_dir)
    assert 4 <= step < 24
    checkpoint = load_checkpoint(run_dir / "checkpoints", "last")
    assert checkpoint.state["step"] == step and len(checkpoint.state["rng_by_rank"]) == PROCESSES
    assert not (run_dir / "summary.json").exists()

    # A user error in the processes reaches the launcher as the single-process line, exit code 2.
    result = maskkit("train", "--resume", run_dir, "--nproc", PROCESSES, "--set", "seed=5", env=ENV)
    assert_user_error(result, "seed (saved 0, given 5)")
    assert result.stderr.count("error:") == 1 and last_checkpoint_step(run_dir) == step

    result = maskkit("train", "--resume", run_dir, env=ENV)  # one process now
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pretrain"]["level_steps"] == {"pretrain": 24, "finetune": 12, "mask": 12}
    stages = {"pretrain": 0, "finetune": 1}
    trained = [r for r in _records(run_dir) if "loss/pretrain" in r or "train/loss" in r]
    logged = [(stages[r["stage"]], r["step"]) for r in trained]
    assert logged == sorted(set(logged)), "a step was logged twice or out of order"
    assert logged[-1] == (1, 3) and (0, 24) in logged


FAULTS = """
import os
if os.environ.get("RANK") == "1":
    import time
    from maskkit.engine import objectives

    step = objectives.MLOObjectives.finetune_loss

    def faulty(self, batch):
        if self.counts["finetune/step"] == 2:
            if os.environ["MASKKIT_TEST_FAULT"] == "raise":
                raise RuntimeError("injected failure on rank 1")
            time.sleep(3600)
        return step(self, batch)

    objectives.MLOObjectives.finetune_loss = faulty
"""


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["raise", "hang"])
def test_a_process_that_raises_or_hangs_ends_the_job(data_dir, tmp_path, fault):
    (tmp_path / "sitecustomize.py").write_text(FAULTS)  # runs at start-up in every process
    run_dir, timeout = tmp_path / "run", 20
    environment = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    started = time.monotonic()
    launcher = _start(
        "train", "--nproc", PROCESSES, *RUN_OPTIONS, "--data-dir", data_dir, "--run-dir", run_dir,
        "--set", "pretrain.checkpoint_every=1", "--collective-timeout", timeout,
        env={**environment, "MASKKIT_TEST_FAULT": fault},
    )  # fmt: skip
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == 1, stderr
    errors = _error_lines(stderr)
    assert len(errors) == 1, stderr
    if fault == "raise":
        assert "process 1 of 2 failed: RuntimeError: injected failure on rank 1" in errors[0]
    else:  # rank 0 gives up waiting after the timeout; torchrun stops rank 1
        assert "process 0 of 2 failed: lost contact with the other processes" in errors[0]
        assert f"collective timeout of {timeout} s" in errors[0]
        assert time.monotonic() - started < 240
    assert f"--resume {run_dir} --nproc 2" in errors[0]
    # its third finetune step comes after pretrain step 5 (unroll 2)
    assert last_checkpoint_step(run_dir) >= 4
    load_checkpoint(run_dir / "checkpoints", "last")


def _failure(exitcode: int, message, timestamp: int = 100):
    return SimpleNamespace(
        exitcode=exitcode,
        message=message,
        timestamp=timestamp,
        signal_name=lambda: signal.Signals(-exitcode).name if exitcode < 0 else "<N/A>",
    )


def test_the_launcher_names_the_root_cause_not_its_consequences():
    lost = {"message": "lost contact with the other processes during averaging gradients: ..."}
    failures = {
        0: _failure(1, lost, timestamp=99),  # noticed first, but only noticed
        1: _failure(-signal.SIGKILL, "Signal 9 (SIGKILL) received by PID 7", timestamp=101),
        # stopped by torchrun because process 1 failed
        2: _failure(-signal.SIGTERM, "Signal 15 (SIGTERM) received by PID 8", timestamp=100),
    }
    message, code = _failure_message(SimpleNamespace(failures=failures), 3, "runs/x")
    assert code == 1
    assert message.startswith("process 1 of 3 failed: it was killed by signal SIGKILL. All 3 processes")
    assert message.endswith("continue with maskkit train --resume runs/x --nproc 3.")
    user_error = {"message": "unknown policy 'x'. Available: mlo, random."}
    message, code = _failure_message(SimpleNamespace(failures={0: _failure(2, user_error)}), 2, None)
    assert (message, code) == ("unknown policy 'x'. Available: mlo, random.", 2)


def test_nproc_under_torchrun_is_refused(monkeypatch):
    from typer.testing import CliRunner

    from maskkit.cli import app

    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["train", "--nproc", "2", "--preset", "smoke"])
    assert isinstance(result.exception, ConfigError) and "--nproc_per_node" in str(result.exception)
