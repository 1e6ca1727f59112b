"""``maskkit bench --executor slurm|ray``: the cells as submitit jobs and as Ray actors.

No cluster here: the Slurm path runs on submitit's local executor (``slurm: {cluster: local}``,
each job a process tree of its own, as on a node), the Ray path on a local Ray instance
(``ray.init(num_cpus=2)``). Both must give the report rows of the local executor; a job killed
mid-run (as a node that dies) is recorded with the scheduler's reason, and its cell resumes from
its checkpoint. The Slurm bench, interrupted, leaves its jobs running and the next bench
re-attaches to them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from helpers import MASKKIT_CLI
from rich.console import Console

import maskkit.bench
from maskkit.bench.attempt import CellState, CellTask
from maskkit.bench.cells import expand_grid
from maskkit.bench.executors.jobs import run_slurm_cell
from maskkit.bench.executors.settings import ExecutorOptions
from maskkit.bench.journal import read_journal
from maskkit.bench.layout import SuiteLayout
from maskkit.bench.main import BenchOptions, run_bench
from maskkit.bench.suite import load_suite
from maskkit.cli import main
from maskkit.errors import ConfigError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

HEADER = "=== maskkit bench,"
NONE_CELL = "dermamnist/none/seed-0"
STEPS = 200
SUITE = {
    "name": "executors",
    "preset": "smoke",
    "seeds": [0],
    # Long enough to be caught midway; a checkpoint every 5 steps.
    "config": {"pretrain": {"steps": STEPS, "checkpoint_every": 5, "eval_every": STEPS}},
    "datasets": [{"dataset": "dermamnist"}],
    "policies": ["none", "random"],
    "slurm": {"cluster": "local", "gpus_per_cell": 0},
}
#: What must not depend on the executor: everything but times, paths and the reason.
SAME_COLUMNS = (
    "dataset",
    "policy",
    "seed",
    "status",
    "test_balanced_accuracy",
    "test_auc",
    "test_accuracy",
    "test_weighted_f1",
    "test_macro_f1",
    "linear_probe_balanced_accuracy",
    "linear_probe_auc",
    "linear_probe_accuracy",
    "knn_balanced_accuracy",
    "knn_auc",
    "knn_accuracy",
    "exit_code",
)


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("suite") / "executors.yaml"
    path.write_text(yaml.safe_dump(SUITE))
    return path


@pytest.fixture(scope="module", autouse=True)
def isolated_cells() -> Iterator[None]:
    """The cells run ``maskkit`` as the tests do (tests/isolated_cli.py), one thread each."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(maskkit.bench, "CELL_CLI", list(MASKKIT_CLI))
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


def _bench(
    suite_file: Path, out: Path, data_dir: Path, executor: str = "local", **options
) -> tuple[int, str]:
    """``maskkit bench`` in this process; its exit status and what it printed."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, force_terminal=False)
    bench = BenchOptions(
        suite_file,
        out,
        options.pop("workers", None),
        1,
        data_dir,
        executor=ExecutorOptions(executor, **options),
    )
    return run_bench(bench, console), buffer.getvalue()


def _rows(out: Path) -> list[dict[str, str]]:
    return [
        {column: row[column] for column in SAME_COLUMNS}
        for row in csv.DictReader(io.StringIO((out / "cells.csv").read_text()))
    ]


def _run_dir(out: Path, policy: str) -> Path:
    return out / "runs" / "dermamnist" / policy / "seed-0"


def _checkpoint_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "checkpoints" / "last.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def _processes() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, command line) of every process (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError):
                continue
            found[int(entry.name)] = (int(stat[1]), command)
    return found


def _cell_process(run_dir: Path) -> tuple[int, int] | None:
    """(pid, parent pid) of the ``maskkit train`` of ``run_dir``, if it runs."""
    for pid, (parent, command) in _processes().items():
        if str(run_dir) in command and " train " in command:
            return pid, parent
    return None


def _wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _in_background(action: Callable[[], None]) -> list[BaseException]:
    """Run ``action`` on a thread; what it raised, to check after the bench returns."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as error:
            errors.append(error)

    threading.Thread(target=run, daemon=True).start()
    return errors


@pytest.fixture(scope="module")
def local_rows(suite_file: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The report rows of the local executor, two workers of one thread."""
    out = tmp_path_factory.mktemp("local") / "out"
    code, output = _bench(suite_file, out, data_dir, workers=2)
    assert code == 0, output
    rows = _rows(out)
    assert [row["status"] for row in rows] == ["done", "done"]
    return rows


# --- errors a user can make: one line, exit code 2 ---------------------------------------------


def _cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *arguments: object
) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["maskkit", "bench", *map(str, arguments)])
    with pytest.raises(SystemExit) as ended:
        main()
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return ended.value.code, captured.err


def test_an_unknown_executor_names_the_nearest(monkeypatch, capsys, suite_file):
    code, err = _cli(monkeypatch, capsys, suite_file, "--executor", "slrum")
    assert code == 2 and "unknown executor 'slrum'. Did you mean 'slurm'?" in err


@pytest.mark.parametrize(("executor", "package"), [("slurm", "submitit"), ("ray", "ray")])
def test_a_missing_extra_names_the_install_line(monkeypatch, capsys, suite_file, data_dir, executor, package):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    code, err = _cli(monkeypatch, capsys, suite_file, "--data-dir", data_dir, "--executor", executor)
    assert code == 2 and f"pip install 'maskkit[{executor}]'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--slurm-option", "partiton=gpu"],
            "unknown Slurm option 'partiton'. Did you mean --slurm-partition",
        ),
        (
            ["--slurm-option", "constrain=a100"],
            "unknown Slurm option 'constrain'. Did you mean 'constraint'?",
        ),
        (["--slurm-option", "qos"], "--slurm-option expects KEY=VALUE"),
        (["--slurm-option", "time=10"], "Slurm option 'time' is set by --slurm-time"),
    ],
)
def test_bad_slurm_options_are_refused(monkeypatch, capsys, suite_file, data_dir, arguments, message):
    code, err = _cli(
        monkeypatch, capsys, suite_file, "--data-dir", data_dir, "--executor", "slurm", *arguments
    )
    assert code == 2 and message in err


def test_an_option_of_another_executor_is_refused(monkeypatch, capsys, suite_file, data_dir):
    code, err = _cli(monkeypatch, capsys, suite_file, "--data-dir", data_dir, "--slurm-partition", "gpu")
    assert code == 2 and "--slurm-partition: not read by --executor local" in err


def test_a_partition_slurm_refuses_ends_in_its_message(monkeypatch, capsys, suite_file, data_dir, tmp_path):
    fake = tmp_path / "bin" / "sbatch"  # Slurm's answer to an unknown partition
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\nexit 1\n")
    fake.chmod(0o755)
    (fake.parent / "srun").symlink_to(fake)  # submitit looks for it; the job never starts
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    suite = {**SUITE, "slurm": {"cluster": "slurm"}}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    arguments = ["--data-dir", data_dir, "--out", tmp_path / "out", "--executor", "slurm"]
    code, err = _cli(monkeypatch, capsys, tmp_path / "suite.yaml", *arguments, "--slurm-partition", "nope")
    assert code == 2
    assert "Slurm refused the job of cell dermamnist/none/seed-0: sbatch: error: invalid partition" in err
    assert len(err.strip().splitlines()) == 1  # submitit's own echo of sbatch's error is not shown
    registry = tmp_path / "out" / "jobs" / "submitted.json"
    assert not registry.exists() or json.loads(registry.read_text()) == {}


def test_an_unreachable_ray_cluster_is_refused_at_once(monkeypatch, capsys, suite_file, data_dir):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    started = time.monotonic()
    code, err = _cli(monkeypatch, capsys, suite_file, "--data-dir", data_dir, "--executor", "ray",
                     "--ray-address", "127.0.0.1:1")  # fmt: skip
    assert code == 2 and "cannot reach the Ray cluster at 127.0.0.1:1" in err
    assert time.monotonic() - started < 30


def test_the_cli_and_the_job_side_import_neither_submitit_nor_ray_nor_torch():
    code = (
        "import sys\n"
        "from maskkit.cli import app\n"
        "try:\n    app(['bench', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert not {'submitit', 'ray'} & set(sys.modules), 'help'\n"
        "import maskkit.bench.executors.jobs\n"
        "assert not {'submitit', 'ray', 'torch'} & set(sys.modules), 'job side'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_nproc_runs_each_attempt_under_torchrun(tmp_path, suite_file):
    cell = expand_grid(load_suite(suite_file), SuiteLayout(tmp_path), data_dir=tmp_path)[1]
    task = cell.task(2, ["maskkit"], nproc=4)
    assert task.command(CellState.NEW)[-2:] == ["--nproc", "4"]
    assert task.command(CellState.PARTIAL) == [
        "maskkit",
        "train",
        "--resume",
        str(cell.run_dir),
        "--nproc",
        "4",
    ]
    assert "--nproc" not in cell.task(2, ["maskkit"]).command(CellState.NEW)


# A stand-in for `maskkit train`: it trains until SIGINT, then exits as maskkit train does.
FAKE_CELL = """
import signal, sys, time
def stop(*_):
    print("interrupted", flush=True)
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
print("training", flush=True)
time.sleep(60)
"""


def test_a_slurm_job_signalled_before_its_time_limit_stops_its_cell_cleanly(tmp_path):
    fake = tmp_path / "fake_cell.py"
    fake.write_text(FAKE_CELL)
    log = tmp_path / "cell.log"
    task = CellTask(
        key="d/p/seed-0",
        run_dir=tmp_path / "run",
        config_file=tmp_path / "config.yaml",
        config_yaml="{}\n",
        log_file=log,
        protocols=True,
        new_command=(sys.executable, str(fake)),
        resume_command=(sys.executable, str(fake)),
        threads=1,
    )

    def signal_when_training() -> None:  # what Slurm does, through submitit, before the limit
        _wait_for(lambda: log.is_file() and "training" in log.read_text(), 30, "the cell")
        os.kill(os.getpid(), signal.SIGUSR2)

    errors = _in_background(signal_when_training)
    result = run_slurm_cell(task)
    assert not errors
    assert result is not None and result.exit_code == 130 and result.interrupted
    assert "SIGUSR2" in result.reason and "time limit" in result.reason
    assert "interrupted" in log.read_text() and "stopped: job" in log.read_text()
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL  # handlers restored


# --- the cells as submitit jobs -----------------------------------------------------------------


@pytest.mark.slow
def test_submitit_jobs_run_the_cells_reattach_and_a_killed_one_resumes(
    suite_file, data_dir, tmp_path, local_rows
):
    out = tmp_path / "out"
    registry = out / "jobs" / "submitted.json"
    random_dir = _run_dir(out, "random")

    # 1. Two cells, two jobs; the bench is interrupted (Ctrl-C) once the second one trains: its
    #    jobs run on, recorded in the output dir.
    inside = threading.Event()

    def interrupt_when_training() -> None:
        _wait_for(lambda: _checkpoint_step(random_dir) > 0, 240, "the random cell's first checkpoint")
        if inside.is_set():
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, lambda *_: _raise_if(inside))
    try:
        errors = _in_background(interrupt_when_training)
        inside.set()
        code, output = _bench(suite_file, out, data_dir, "slurm")
        inside.clear()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not errors and code == 128 + signal.SIGINT, output
    assert "keep running" in output
    jobs = json.loads(registry.read_text())
    random_job = jobs["dermamnist/random/seed-0"]["job"]
    # The `none` cell's job: still running (in the registry) or, on a loaded machine, already done
    # and journalled by this bench before the interrupt.
    first_records = [r for r in read_journal(out / "journal.jsonl") if r["event"] == "cell"]
    none_job = jobs.get(NONE_CELL, {}).get("job") or next(
        r["job"] for r in first_records if r["cell"] == NONE_CELL
    )
    controller = int(random_job)
    assert controller in _processes() and controller != os.getpid()

    # Another executor refuses the cells whose jobs still run.
    with pytest.raises(ConfigError, match="still run as jobs an earlier"):
        _bench(suite_file, out, data_dir, "local")

    # 2. The same command re-attaches to the running job (no new attempt) and, when the job is
    #    killed as a node that dies would kill it, records why; the suite goes on.
    killed_at: list[int] = []

    def kill_the_job_once_reattached() -> None:
        _wait_for(lambda: "re-attached to submitit local job " + random_job in buffer_of[0].getvalue(), 120,
                  "the re-attachment")  # fmt: skip
        task = next(pid for pid, (parent, _) in _processes().items() if parent == controller)
        os.kill(task, signal.SIGKILL)  # the job's own process: its cell follows it
        _wait_for(lambda: _cell_process(random_dir) is None, 60, "the cell to follow its job")
        killed_at.append(_checkpoint_step(random_dir))

    buffer_of: list[io.StringIO] = []
    code, output = _bench_watched(suite_file, out, data_dir, "slurm", kill_the_job_once_reattached, buffer_of)
    assert code == 1, output
    assert 0 < killed_at[0] < STEPS, killed_at
    records = [record for record in read_journal(out / "journal.jsonl") if record["event"] == "cell"]
    by_cell = {record["cell"]: record for record in records}
    assert by_cell["dermamnist/random/seed-0"]["job"] == random_job  # the job of the first bench
    assert by_cell["dermamnist/random/seed-0"]["exit_code"] is None
    assert (
        f"submitit local job {random_job} ended without a result"
        in by_cell["dermamnist/random/seed-0"]["reason"]
    )
    assert by_cell[NONE_CELL]["job"] == none_job
    assert by_cell[NONE_CELL]["job"] != random_job  # two cells, two jobs
    assert (out / "logs" / "dermamnist-random-seed0.log").read_text().count(HEADER) == 1
    status = {row["policy"]: row["status"] for row in _rows(out)}
    assert status == {"none": "done", "random": "stopped"}
    assert "ended without a result" in (out / "results.md").read_text()
    assert json.loads(registry.read_text()) == {}

    # 3. The suite finishes on another executor: the killed cell resumes from its checkpoint (read
    #    again now: on a loaded machine a dying cell can still finish the next one after the first
    #    reading).
    resumed_from = _checkpoint_step(random_dir)
    assert killed_at[0] <= resumed_from < STEPS
    code, output = _bench(suite_file, out, data_dir, "local")
    assert code == 0, output
    log = (out / "logs" / "dermamnist-random-seed0.log").read_text()
    resumed = [line for line in log.splitlines() if "checkpoint" in line or "starting run" in line]
    assert f"from its pretrain checkpoint at step {resumed_from}" in log, resumed  # shown on failure
    assert _rows(out) == local_rows


def _raise_if(inside: threading.Event) -> None:
    if inside.is_set():
        raise KeyboardInterrupt


def _bench_watched(
    suite_file: Path,
    out: Path,
    data_dir: Path,
    executor: str,
    watch: Callable[[], None],
    buffer_of: list[io.StringIO],
) -> tuple[int, str]:
    """:func:`_bench` with ``watch`` on a thread (it may read the output as it comes)."""
    buffer = io.StringIO()
    buffer_of.append(buffer)
    errors = _in_background(watch)
    bench = BenchOptions(suite_file, out, None, 1, data_dir, executor=ExecutorOptions(executor))
    code = run_bench(bench, Console(file=buffer, width=200, force_terminal=False))
    assert not errors, errors
    return code, buffer.getvalue()


# --- the cells as Ray actors --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    import ray

    sigterm = signal.getsignal(signal.SIGTERM)  # ray.init sets its own, for good
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="maskkit-bench-tests")
    yield
    ray.shutdown()
    signal.signal(signal.SIGTERM, sigterm)


@pytest.mark.slow
def test_ray_actors_run_the_cells_and_a_killed_one_resumes(
    suite_file, data_dir, tmp_path, local_rows, ray_instance
):
    out = tmp_path / "out"
    random_dir = _run_dir(out, "random")
    killed: list[int] = []

    def kill_the_actor_once_training() -> None:
        _wait_for(lambda: _checkpoint_step(random_dir) > 0, 240, "the random cell's first checkpoint")
        _, actor = _cell_process(random_dir)
        assert actor != os.getpid() and _processes()[actor][1].startswith("ray::")
        os.kill(actor, signal.SIGKILL)  # the actor's process, as a node that dies
        _wait_for(lambda: _cell_process(random_dir) is None, 60, "the cell to follow its actor")
        killed.append(_checkpoint_step(random_dir))

    code, output = _bench_watched(suite_file, out, data_dir, "ray", kill_the_actor_once_training, [])
    assert code == 1, output
    assert 0 < killed[0] < STEPS, killed
    records = {r["cell"]: r for r in read_journal(out / "journal.jsonl") if r["event"] == "cell"}
    assert records["dermamnist/none/seed-0"]["exit_code"] == 0
    assert "died" in records["dermamnist/random/seed-0"]["reason"]
    assert records["dermamnist/none/seed-0"]["job"] != records["dermamnist/random/seed-0"]["job"]
    assert {row["policy"]: row["status"] for row in _rows(out)} == {"none": "done", "random": "stopped"}
    assert "Ray actor" in (out / "results.md").read_text()

    code, output = _bench(suite_file, out, data_dir, "ray")
    assert code == 0, output
    log = (out / "logs" / "dermamnist-random-seed0.log").read_text()
    assert f"from its pretrain checkpoint at step {killed[0]}" in log
    assert _rows(out) == local_rows
