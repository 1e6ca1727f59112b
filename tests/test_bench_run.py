"""``maskkit bench`` end to end: the smoke suite; a bench killed midway, run again; a stop."""

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
from pathlib import Path

import pytest
import yaml
from helpers import MASKKIT_CLI
from PIL import Image
from rich.console import Console

import maskkit.bench
from maskkit.bench.cells import expand_grid
from maskkit.bench.journal import Journal, read_journal
from maskkit.bench.layout import SuiteLayout
from maskkit.bench.runner import BenchStopped, CellPool, stop_on_sigterm
from maskkit.bench.suite import load_suite
from maskkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
HEADER = "=== maskkit bench"
SMALL_SUITE = {
    "name": "small",
    "preset": "smoke",
    "seeds": [0],
    "config": {"pretrain": {"steps": 2}},
    "datasets": [{"dataset": "dermamnist"}],
}


def _environment(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MASKKIT_PRIORS_DIR": str(tmp_path / "priors"),
        "COLUMNS": "160",
        "OMP_NUM_THREADS": "1",
    }


def _bench(tmp_path: Path, *args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [*MASKKIT_CLI, "bench", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_environment(tmp_path),
    )


def _rows(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((out / "cells.csv").read_text())))


@pytest.mark.slow
def test_the_smoke_suite_runs_every_built_in_policy_and_writes_the_report(tmp_path, data_dir):
    out = tmp_path / "out"
    started = time.perf_counter()
    process = _bench(
        tmp_path, ROOT / "benchmarks" / "smoke.yaml", "--data-dir", data_dir, "--out", out, "--workers", 2
    )
    output, _ = process.communicate(timeout=600)
    seconds = time.perf_counter() - started
    assert process.returncode == 0, output
    rows = _rows(out)
    policies = yaml.safe_load((ROOT / "benchmarks" / "smoke.yaml").read_text())["policies"]
    assert [row["policy"] for row in rows] == policies
    for row in rows:
        assert row["status"] == "done", row
        for metric in ("test_accuracy", "test_weighted_f1", "linear_probe_accuracy", "knn_accuracy"):
            assert 0.0 <= float(row[metric]) <= 1.0, (row["policy"], metric)
        for metric in ("test_balanced_accuracy", "linear_probe_balanced_accuracy"):
            assert 0.0 <= float(row[metric]) <= 1.0, (row["policy"], metric)
    markdown = (out / "results.md").read_text()
    assert "## Paired difference to `random`" in markdown and "## Per class: dermamnist" in markdown
    assert "| *MDE* |" in markdown
    assert all(f"| `{policy}` |" in markdown for policy in policies)
    for png in ("results.png", "forest.png"):
        with Image.open(out / png) as image:
            assert image.format == "PNG"
    # The guided cells read the centre prior, built once, up front, in the store the test named.
    assert len(list((tmp_path / "priors").rglob("*.safetensors"))) == 3  # train, val, test
    print(f"smoke suite, 2 workers: {seconds:.1f} s")


def _cell_processes(run_dir: Path) -> list[int]:
    """Ids of the processes whose command line names ``run_dir`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(run_dir) in command and "pytest" not in command:
                found.append(int(entry.name))
    return found


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _checkpoint_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "checkpoints" / "last.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


@pytest.mark.slow
@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; the bench's kill -9 guard is Linux's"
)
def test_a_killed_bench_finishes_only_the_missing_cells(tmp_path, data_dir, monkeypatch, capsys):
    suite = {
        **SMALL_SUITE,
        # Long enough to be caught midway; a checkpoint every 5 steps.
        "config": {"pretrain": {"steps": 150, "checkpoint_every": 5, "eval_every": 150}},
        # A cell that fails: its policy refuses the option.
        "policies": [
            "none",
            "random",
            {"name": "broken", "policy": "random", "policy_options": {"no_such": 1}},
        ],
    }
    suite_file = tmp_path / "resume.yaml"
    suite_file.write_text(yaml.safe_dump(suite))
    out = tmp_path / "out"
    arguments = (suite_file, "--data-dir", data_dir, "--out", out, "--threads", 1)
    first, second = (
        out / "runs" / "dermamnist" / "none" / "seed-0",
        out / "runs" / "dermamnist" / "random" / "seed-0",
    )

    # kill -9 of the bench while the second cell trains: the cell dies with it.
    bench = _bench(tmp_path, *arguments)
    _wait_for(lambda: _checkpoint_step(second) > 0, 300, "the second cell's first checkpoint")
    bench.kill()
    bench.communicate(timeout=60)
    _wait_for(lambda: not _cell_processes(second), 30, "the cell to follow the killed bench")
    assert (first / "summary.json").is_file() and not (second / "summary.json").exists()
    finished, killed_at = (first / "summary.json").stat().st_mtime_ns, _checkpoint_step(second)
    assert 0 < killed_at < 150

    # Run again: only the missing cells run, the killed one from its checkpoint, to the end; the
    # broken one fails, and is reported with its log. (Two workers: the two run side by side.)
    # Its checkpoint is read again now: on a loaded machine a dying cell can still finish the
    # next one after the first reading.
    resumed_from = _checkpoint_step(second)
    assert killed_at <= resumed_from < 150
    bench = _bench(tmp_path, *arguments, "--workers", 2)
    output, _ = bench.communicate(timeout=600)
    assert bench.returncode == 1, output
    assert "1 done, 1 to resume, 1 new" in output and "1 cell(s) failed: dermamnist/broken/seed-0" in output
    broken_log = out / "logs" / "dermamnist-broken-seed0.log"
    assert "no_such" in broken_log.read_text() and f"`{broken_log}`" in (out / "results.md").read_text()
    text = (out / "logs" / "dermamnist-random-seed0.log").read_text()
    attempts = [line for line in text.splitlines() if line.startswith(HEADER)]
    assert len(attempts) == 2 and ["train --resume" in line for line in attempts] == [False, True]
    resumes = [line for line in text.splitlines() if "checkpoint at step" in line]
    assert f"from its pretrain checkpoint at step {resumed_from}" in text, resumes  # shown on failure
    assert (out / "logs" / "dermamnist-none-seed0.log").read_text().count(HEADER) == 1
    assert (first / "summary.json").stat().st_mtime_ns == finished
    assert [row["status"] for row in _rows(out)] == ["done", "done", "failed"]
    assert len({record["invocation"] for record in read_journal(out / "journal.jsonl")}) == 2

    # Nothing left to run; the report can be rebuilt alone.
    (out / "results.md").unlink()
    monkeypatch.setattr(sys, "argv", ["maskkit", "bench", *map(str, arguments), "--dry-run"])
    with pytest.raises(SystemExit) as ended:
        main()
    listing = capsys.readouterr().out
    assert ended.value.code == 0 and listing.count(" done ") == 2 and listing.count(" new ") == 1
    monkeypatch.setattr(sys, "argv", ["maskkit", "bench", *map(str, arguments), "--report-only"])
    with pytest.raises(SystemExit) as ended:
        main()
    assert ended.value.code == 0 and (out / "results.md").is_file()


# A stand-in for `maskkit train`: it trains until Ctrl-C, then exits as maskkit train does.
FAKE_CELL = """
import signal, sys, time
def stop(*_):
    print("interrupted", flush=True)
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
print("training", flush=True)
time.sleep(120)
"""


def test_sigterm_stops_the_running_cells_cleanly_and_records_them(tmp_path, monkeypatch):
    fake = tmp_path / "fake_cell.py"
    fake.write_text(FAKE_CELL)
    monkeypatch.setattr(maskkit.bench, "CELL_CLI", [sys.executable, str(fake)])
    suite = {**SMALL_SUITE, "policies": ["random", "blockwise", "none"]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    layout = SuiteLayout(tmp_path / "out")
    cells = expand_grid(load_suite(tmp_path / "suite.yaml"), layout, data_dir=tmp_path)
    pool = CellPool(2, 1, Journal(layout.journal), Console(quiet=True))

    def terminate_when_both_train() -> None:
        logs = [cell.log_file for cell in cells[:2]]
        _wait_for(
            lambda: all(log.is_file() and "training" in log.read_text() for log in logs), 60, "the cells"
        )
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_when_both_train, daemon=True).start()
    with pytest.raises(BenchStopped), stop_on_sigterm():
        pool.run(cells, lambda outcome: None)
    records = [record for record in read_journal(layout.journal) if record["event"] == "cell"]
    assert [(record["cell"], record["exit_code"]) for record in records] == [
        ("dermamnist/random/seed-0", 130),
        ("dermamnist/blockwise/seed-0", 130),
    ]
    assert all("interrupted" in cell.log_file.read_text() for cell in cells[:2])
    assert not cells[2].log_file.exists()  # the third never started
    assert not _cell_processes(Path(str(fake)))
