"""Damaged run files: every command that reads one ends in one line naming the file and what to
do (exit code 2, no traceback), and ``train --resume`` falls back to the newest intact checkpoint.

Each kind of file a run keeps (checkpoint weights and state, checkpoint pointers,
``metrics.jsonl``, ``summary.json``, the priors store) is damaged two ways: cut in half
(a full disk, a copy that stopped) and overwritten with random bytes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import MASKKIT_CLI

from maskkit.bench.cells import expand_grid
from maskkit.bench.layout import SuiteLayout
from maskkit.bench.suite import load_suite
from maskkit.checkpoint import DAMAGED_PREFIX, load_checkpoint
from maskkit.config import config_to_yaml
from maskkit.errors import DamagedFileError
from maskkit.rundir import RunDir

#: The smoke preset's steps: pretraining ends at step 8 (``pretrained``), fine-tuning at 10
#: (``last`` and ``final``).
PRETRAINED, FINAL = "step-000000008", "step-000000010"


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def garbage(data: bytes) -> bytes:
    generator = random.Random(len(data))
    return bytes(generator.randrange(256) for _ in range(max(len(data), 64)))


DAMAGES = {"truncated": truncated, "garbage": garbage}


def damage(path: Path, how: str) -> None:
    path.write_bytes(DAMAGES[how](path.read_bytes()))


def maskkit(*args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "COLUMNS": "80", **(env or {})}
    return subprocess.run(
        [*MASKKIT_CLI, *map(str, args)], capture_output=True, text=True, env=environment, timeout=600
    )


def assert_damaged(result: subprocess.CompletedProcess, path: Path, *fragments: str) -> None:
    """Exit code 2 and one ``error:`` line on stderr naming ``path`` as damaged; no traceback."""
    assert result.returncode == 2, result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path} is damaged ("), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "random"
    result = maskkit(
        "train", "--policy", "random", "--preset", "smoke", "--data-dir", data_dir, "--run-dir", run_dir
    )
    assert result.returncode == 0, result.stderr + result.stdout
    pointers = {p.stem: json.loads(p.read_text())["dir"] for p in (run_dir / "checkpoints").glob("*.json")}
    assert pointers == {"pretrained": PRETRAINED, "last": FINAL, "final": FINAL}
    return run_dir


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A copy of the finished run, free to damage."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


@pytest.mark.slow
@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize(
    ("command", "file"),
    [
        ("evaluate", f"checkpoints/{FINAL}/mae.safetensors"),
        ("evaluate", f"checkpoints/{FINAL}/state.pt"),
        ("evaluate", "checkpoints/final.json"),
        ("visualize", f"checkpoints/{PRETRAINED}/policy.safetensors"),
        ("visualize", f"checkpoints/{PRETRAINED}/state.pt"),
    ],
)
def test_a_damaged_checkpoint_file_is_one_line(run, tmp_path, command, file, how):
    damage(run / file, how)
    before = sorted(path.relative_to(run) for path in run.rglob("*"))
    result = maskkit(command, run, *(["--output", tmp_path / "grid.png"] if command == "visualize" else []))
    assert_damaged(result, run / file, f"maskkit train --resume {run}")
    assert sorted(path.relative_to(run) for path in run.rglob("*")) == before  # nothing written
    assert not (tmp_path / "grid.png").exists()


@pytest.mark.slow
def test_resume_falls_back_to_the_newest_intact_checkpoint(run):
    """``last`` (the end of fine-tuning) is damaged and summary.json gone: the run resumes from
    the end of pretraining, with a warning, and finishes; the damaged checkpoint is set aside."""
    damage(run / "checkpoints" / FINAL / "mae.safetensors", "truncated")
    (run / "summary.json").unlink()
    metrics = (run / "metrics.jsonl").read_bytes()
    (run / "metrics.jsonl").write_bytes(metrics[:-20])  # a last line cut mid-write, as a crash leaves
    result = maskkit("train", "--resume", run)
    assert result.returncode == 0, result.stderr + result.stdout
    output = " ".join((result.stdout + result.stderr).split())
    assert f"warning: checkpoint {FINAL} is damaged (mae.safetensors: SafetensorError" in output
    assert f"resuming from {PRETRAINED}, the newest intact one" in output
    assert "from its pretrain checkpoint at step 8" in output
    assert json.loads((run / "summary.json").read_text())["test"]["num_samples"] > 0
    assert (run / "checkpoints" / f"{DAMAGED_PREFIX}{FINAL}" / "mae.safetensors").is_file()  # kept
    assert load_checkpoint(run / "checkpoints", "last").state["stage"] == "finetune"  # written again
    # The cut line and the records after step 8 were dropped; fine-tuning logged once again.
    finetune_steps = [
        record["step"] for record in RunDir(run).read_metrics() if record["stage"] == "finetune"
    ]
    assert finetune_steps and len(finetune_steps) == len(set(finetune_steps))


@pytest.mark.slow
@pytest.mark.parametrize("how", DAMAGES)
def test_resume_with_no_intact_checkpoint_is_one_line(run, how):
    (run / "summary.json").unlink()
    for directory in (PRETRAINED, FINAL):
        damage(run / "checkpoints" / directory / "state.pt", how)
    result = maskkit("train", "--resume", run)
    assert_damaged(result, run / "checkpoints" / FINAL / "state.pt", "no intact checkpoint is left")
    assert not list((run / "checkpoints").glob(f"{DAMAGED_PREFIX}*"))  # nothing renamed


@pytest.mark.slow
@pytest.mark.parametrize(
    ("how", "problem"),
    [("garbage", "is not UTF-8 text"), ("middle line", "line 2 is not a JSON record")],
)
def test_a_damaged_metrics_log_is_one_line(run, how, problem):
    (run / "summary.json").unlink()
    path = run / "metrics.jsonl"
    if how == "garbage":
        damage(path, how)
    else:
        lines = path.read_text().splitlines(keepends=True)
        path.write_text(lines[0] + "#garbage\n" + "".join(lines[1:]))
    before = path.read_bytes()
    result = maskkit("train", "--resume", run)
    assert_damaged(result, path, problem, "delete the damaged lines")
    assert path.read_bytes() == before


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_summary_is_one_line_in_the_bench_report(tmp_path, how):
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(
        yaml.safe_dump(
            {
                "name": "one",
                "preset": "smoke",
                "seeds": [0],
                "datasets": [{"dataset": "dermamnist"}],
                "policies": ["random"],
            }
        )
    )
    layout = SuiteLayout(tmp_path / "out")
    (cell,) = expand_grid(load_suite(suite_file), layout, data_dir=tmp_path)
    cell.run_dir.mkdir(parents=True)
    (cell.run_dir / "config.yaml").write_text(config_to_yaml(cell.config))
    protocols = {"linear_probe": {"test": {"accuracy": 0.5}}, "knn": {"test": {"accuracy": 0.5}}}
    (cell.run_dir / "protocols.json").write_text(json.dumps(protocols))  # the bench runs both
    summary = cell.run_dir / "summary.json"
    summary.write_text(json.dumps({"test": {"accuracy": 0.5, "weighted_f1": 0.5, "macro_f1": 0.5}}))
    damage(summary, how)
    with pytest.raises(DamagedFileError, match=r"summary\.json is damaged"):
        RunDir(cell.run_dir).read_json("summary.json")
    result = maskkit("bench", suite_file, "--out", layout.root, "--report-only")
    assert_damaged(result, summary, "not JSON", f"maskkit train --resume {cell.run_dir}")


#: A ``semantic-soft`` run that reads the ``center`` priors and trains nothing (no steps).
PRIOR_RUN = (
    "train", "--policy", "semantic-soft", "--prior", "center", "--preset", "smoke",
    "--set", "pretrain.steps=0", "--set", "finetune.epochs=0",
)  # fmt: skip


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    """A finished ``semantic-soft`` run (no training steps) and the priors store it built."""
    root = tmp_path_factory.mktemp("priors")
    store, run_dir = root / "store", root / "run"
    result = maskkit(
        *PRIOR_RUN, "--data-dir", data_dir, "--run-dir", run_dir, "--build-priors",
        env={"MASKKIT_PRIORS_DIR": str(store)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    # As a run trained on priors built beforehand: one saved with build_priors would rebuild them.
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["data"]["build_priors"] = False
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run_dir, store


@pytest.mark.slow
@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_priors_store_file_is_one_line_and_rebuilt_on_request(prior_run, data_dir, tmp_path, how):
    run_dir, store = prior_run
    (stored,) = (store / "dermamnist" / "center").glob("train-*.safetensors")
    intact = stored.read_bytes()
    env = {"MASKKIT_PRIORS_DIR": str(store)}
    try:
        damage(stored, how)
        result = maskkit("visualize", run_dir, "--output", tmp_path / "grid.png", env=env)
        assert_damaged(result, stored, "maskkit priors build --provider center --dataset dermamnist")
        train = [*PRIOR_RUN, "--data-dir", data_dir]
        result = maskkit(*train, "--run-dir", tmp_path / "new", env=env)
        assert_damaged(result, stored, "or pass --build-priors")
        assert not (tmp_path / "new").exists()
        result = maskkit(*train, "--run-dir", tmp_path / "rebuilt", "--build-priors", env=env)
        assert result.returncode == 0, result.stderr + result.stdout
        assert stored.read_bytes() == intact  # the same maps, computed again
    finally:
        stored.write_bytes(intact)
