"""Suite files: validation up front (one line, exit 2), and the grid of cells they expand to."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import MASKKIT_CLI

from maskkit.bench.cells import CellState, expand_grid, select
from maskkit.bench.layout import SuiteLayout
from maskkit.bench.suite import load_suite
from maskkit.cli import main
from maskkit.config import load_run_config
from maskkit.errors import ConfigError, UnknownNameError
from maskkit.plugins import get_registry

ROOT = Path(__file__).resolve().parents[1]

GRID = {
    "name": "grid",
    "preset": "smoke",
    "seeds": [0, 1],
    "prior": "center",
    "config": {"pretrain": {"steps": 3}},
    "datasets": [
        {"dataset": "dermamnist", "config": {"data": {"subset": 32}}},
        {"name": "folder", "dataset": "imagefolder", "data_dir": "tiny-folder"},
    ],
    "policies": [
        "none",
        "random",
        "semantic-soft",
        {"name": "mlo-wide", "policy": "mlo", "policy_options": {}},
    ],
}


def _suite_file(tmp_path: Path, suite: dict, name: str = "suite.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(suite))
    return path


def _user_error(monkeypatch, capsys, *args: str) -> str:
    """Run ``maskkit ARGS`` in this process; it must end in one ``error:`` line and exit code 2."""
    monkeypatch.setattr(sys, "argv", ["maskkit", *map(str, args)])
    with pytest.raises(SystemExit) as ended:
        main()
    captured = capsys.readouterr()
    assert ended.value.code == 2, captured.err + captured.out
    message = " ".join(captured.err.split())
    assert message.startswith("error:") and "Traceback" not in captured.err, captured.err
    assert message.count("error:") == 1
    return message


def test_a_bad_suite_file_is_one_line_and_exit_2_in_a_real_process(tmp_path):
    broken = _suite_file(tmp_path, {**GRID, "policies": ["random", "no-such-policy"]})
    result = subprocess.run(
        [*MASKKIT_CLI, "bench", str(broken), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error:") and "unknown policy 'no-such-policy'" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"datasets": [{"dataset": "nomnist"}]}, ["unknown dataset 'nomnist'", "dermamnist"]),
        ({"seed": [0]}, ["invalid suite file", "seed: unknown key", "docs/bench.md"]),
        ({"seeds": []}, ["seeds"]),
        ({"seeds": [0, 0]}, ["seeds repeat"]),
        ({"preset": "huge"}, ["unknown preset"]),
        ({"baseline": "mlo-light"}, ["baseline 'mlo-light' is not a policy"]),
        (
            {"config": {"pretrain": {"stepz": 3}}},
            ["cell dermamnist/none/seed-0", "pretrain.stepz: unknown key"],
        ),
        ({"config": {"finetune": {"lr": -1}}}, ["cell dermamnist/none/seed-0", "finetune.lr"]),
        ({"config": {"seed": 5}}, ["sets seed, which the grid decides"]),
        ({"config": {"data": {"dataset": "cifar10"}}}, ["sets data.dataset"]),
        ({"prior": None}, ["cell dermamnist/semantic-soft/seed-0", "pick a provider with --prior"]),
        ({"policies": ["random", {"policy": "random", "prior": "center"}]}, ["label(s) random appear twice"]),
        ({"policies": [{"policy": "random", "name": "a/b"}]}, ["policies.0.name"]),
        (
            {"policies": [{"policy": "none", "policy_options": {"x": 1}}]},
            ["'none' (no pretraining) takes no"],
        ),
        (
            {"policies": [{"policy": "mlo", "config": {"model": {"depth": 2}}}]},
            ["policies[mlo].config sets model", "every cell of a seed shares"],
        ),
        ({"policies": [{"policy": "mlo", "config": {"seed": 3}}]}, ["policies[mlo].config sets seed"]),
        (
            {"policies": [{"policy": "mlo", "config": {"pretrain": {"weightin": "reference"}}}]},
            ["cell dermamnist/mlo/seed-0", "pretrain.weightin: unknown key"],
        ),
    ],
)
def test_every_problem_of_a_suite_is_one_line_before_anything_runs(
    monkeypatch, capsys, tmp_path, change, fragments
):
    path = _suite_file(tmp_path, {**GRID, **change})
    message = _user_error(
        monkeypatch, capsys, "bench", path, "--out", tmp_path / "out", "--data-dir", tmp_path
    )
    for fragment in fragments:
        assert fragment in message, message
    assert not (tmp_path / "out").exists()


def test_command_line_mistakes(monkeypatch, capsys, tmp_path):
    message = _user_error(monkeypatch, capsys, "bench", tmp_path / "absent.yaml")
    assert "absent.yaml does not exist" in message
    path = _suite_file(tmp_path, GRID)
    message = _user_error(
        monkeypatch, capsys, "bench", path, "--only", "policy=nope", "--out", tmp_path / "o"
    )
    assert "--only policy: nope not in the suite" in message
    message = _user_error(monkeypatch, capsys, "bench", path, "--only", "colour=red", "--out", tmp_path / "o")
    assert "--only expects" in message


def test_the_grid_gives_every_cell_the_same_budget(tmp_path):
    layout = SuiteLayout(tmp_path / "out")
    cells = expand_grid(load_suite(_suite_file(tmp_path, GRID)), layout, data_dir=tmp_path / "data")
    assert [cell.key for cell in cells[:3]] == [
        "dermamnist/none/seed-0",
        "dermamnist/none/seed-1",
        "dermamnist/random/seed-0",
    ]
    assert len(cells) == 2 * 4 * 2 and len({cell.run_dir for cell in cells}) == len(cells)
    by_key = {cell.key: cell.config for cell in cells}
    # `none`: any fixed policy with no pretraining at all.
    none = by_key["dermamnist/none/seed-1"]
    assert (none.policy, none.pretrain.steps, none.prior, none.seed) == ("random", 0, None, 1)
    guided = by_key["folder/semantic-soft/seed-0"]
    assert (guided.prior, guided.data.build_priors) == ("center", True)
    assert by_key["folder/mlo-wide/seed-0"].policy == "mlo" and by_key["folder/random/seed-0"].prior is None
    # Data folders: a dataset's data_dir under --data-dir, made absolute.
    assert by_key["folder/random/seed-0"].data.data_dir == (tmp_path / "data" / "tiny-folder").resolve()
    assert by_key["dermamnist/random/seed-0"].data.data_dir == (tmp_path / "data").resolve()
    assert all(config.protocols for config in by_key.values())
    # Fairness: within a dataset, cells differ only in what the grid names.
    grid_keys = {"policy", "policy_options", "prior", "prior_options", "seed"}
    for dataset in ("dermamnist", "folder"):
        shared = []
        for key, config in by_key.items():
            if key.startswith(dataset + "/"):
                dump = config.model_dump(mode="json")
                dump["data"].pop("build_priors")
                if key.split("/")[1] == "none":
                    dump["pretrain"]["steps"] = 3  # its one difference: no pretraining
                shared.append({name: value for name, value in dump.items() if name not in grid_keys})
        assert all(item == shared[0] for item in shared)
    # A dataset's own overrides reach its cells only (the smoke preset's subset is 256).
    assert by_key["dermamnist/random/seed-0"].data.subset == 32
    assert by_key["folder/random/seed-0"].data.subset == 256


def test_a_policy_entry_s_config_reaches_its_own_cells_only(tmp_path):
    suite = {
        **GRID,
        "policies": [
            "random",
            "mlo",
            {
                "name": "mlo-paper-weighting",
                "policy": "mlo",
                "config": {"pretrain": {"weighting": "reference"}},
            },
        ],
    }
    cells = expand_grid(load_suite(_suite_file(tmp_path, suite)), SuiteLayout(tmp_path / "out"), tmp_path)
    weighting = {cell.key: cell.config.pretrain.weighting for cell in cells}
    assert weighting["dermamnist/mlo-paper-weighting/seed-1"] == "reference"
    assert weighting["dermamnist/mlo/seed-1"] == weighting["dermamnist/random/seed-1"] == "tempered"
    by_key = {cell.key: cell.config for cell in cells}
    # The suite's and the dataset's overrides still reach it, under its own.
    overridden = by_key["dermamnist/mlo-paper-weighting/seed-0"]
    assert (overridden.pretrain.steps, overridden.data.subset) == (3, 32)


def test_only_selects_cells(tmp_path):
    cells = expand_grid(load_suite(_suite_file(tmp_path, GRID)), SuiteLayout(tmp_path), data_dir=tmp_path)
    chosen = select(cells, ["policy=random,none", "seed=1"])
    assert [cell.key for cell in chosen] == [
        "dermamnist/none/seed-1",
        "dermamnist/random/seed-1",
        "folder/none/seed-1",
        "folder/random/seed-1",
    ]
    # The same key in two filters adds values; different keys narrow.
    again = select(cells, ["policy=random", "seed=1", "policy=none"])
    assert [cell.key for cell in again] == [cell.key for cell in chosen]


def test_a_run_dir_from_another_suite_is_refused(tmp_path):
    suite = load_suite(_suite_file(tmp_path, GRID))
    cell = expand_grid(suite, SuiteLayout(tmp_path / "out"), data_dir=tmp_path)[2]
    assert cell.state() == CellState.NEW
    cell.prepare_new()
    # What `maskkit train --config` saves: the cell's own config; another data folder is fine.
    cell.run_dir.mkdir(parents=True)
    saved = cell.config.model_copy(
        update={"data": cell.config.data.model_copy(update={"data_dir": Path("/else")})}
    )
    (cell.run_dir / "config.yaml").write_text(yaml.safe_dump(saved.model_dump(mode="json")))
    assert cell.state() == CellState.PARTIAL and load_run_config(cell.run_dir / "config.yaml").seed == 0
    cell.check_saved_config()
    edited = {**GRID, "config": {"pretrain": {"steps": 4}}}
    changed = expand_grid(load_suite(_suite_file(tmp_path, edited, "edited.yaml")), cell.layout, tmp_path)[2]
    with pytest.raises(ConfigError, match=r"pretrain\.steps \(saved 3, given 4\)"):
        changed.check_saved_config()


def test_a_new_cell_clears_what_a_run_killed_before_its_config_left(tmp_path):
    cell = expand_grid(load_suite(_suite_file(tmp_path, GRID)), SuiteLayout(tmp_path / "out"), tmp_path)[0]
    (cell.run_dir / "plots").mkdir(parents=True)
    (cell.run_dir / "metrics.jsonl").write_text("{}\n")
    assert cell.state() == CellState.NEW
    cell.prepare_new()
    assert cell.run_dir.is_dir() and not any(cell.run_dir.iterdir())  # `train --run-dir` takes it
    assert load_run_config(cell.config_file) == cell.config
    (cell.run_dir / "checkpoints" / "step-000000001").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"holds checkpoints but no config\.yaml"):
        cell.prepare_new()


def test_every_suite_in_benchmarks_loads_and_every_cell_is_valid():
    files = sorted((ROOT / "benchmarks").glob("*.yaml"))
    assert {path.stem for path in files} >= {"smoke", "cpu", "cpu-fixed", "gpu", "gpu-small", "paper"}
    for path in files:
        suite = load_suite(path)
        assert suite.baseline_label == "random", path.name
        cells = expand_grid(suite, SuiteLayout(Path("/nonexistent")), data_dir=Path("/nonexistent"))
        assert len(cells) == len(suite.datasets) * len(suite.policies) * len(suite.seeds), path.name


def test_the_suites_cover_every_built_in_policy_and_none():
    built_in = {name for name, info in get_registry().policies.items() if info.distribution == "maskkit"}
    every = built_in | {"none"}
    suites = {name: load_suite(ROOT / "benchmarks" / f"{name}.yaml") for name in ("smoke", "gpu", "paper")}
    for name, suite in suites.items():
        assert set(suite.policy_labels) == every, name
    assert suites["gpu"].seeds == suites["paper"].seeds == [0, 1, 2]
    # The cpu suite keeps the learned policies and the baselines; the static siblings of the guided
    # ones have a suite of their own, at the same budget, beside `random`.
    cpu, fixed = (load_suite(ROOT / "benchmarks" / f"{name}.yaml") for name in ("cpu", "cpu-fixed"))
    assert set(cpu.policy_labels) | set(fixed.policy_labels) == every
    assert {"none", "random"} <= set(cpu.policy_labels) and "random" in fixed.policy_labels
    assert not any(label.endswith("-fixed") for label in cpu.policy_labels)
    same_budget = {key: value for key, value in fixed.config.items() if key != "trial"}
    assert (cpu.preset, cpu.config, cpu.seeds) == (fixed.preset, same_budget, fixed.seeds)
    assert fixed.config["trial"]["forks"] >= 2 and "trial" not in cpu.config  # cpu: sized without it
    assert cpu.config["finetune"]["class_balanced"] is True
    small = load_suite(ROOT / "benchmarks" / "gpu-small.yaml")
    assert {"none", "random", "mlo"} <= set(small.policy_labels) and small.seeds == [0, 1, 2]
    assert set(small.dataset_labels) == {"dermamnist", "cifar10"}


def test_unknown_names_are_reported_with_what_exists(tmp_path):
    with pytest.raises(UnknownNameError, match=r"Available: .*random"):
        expand_grid(load_suite(_suite_file(tmp_path, {**GRID, "policies": ["rnd"]})), SuiteLayout(tmp_path))


def test_malformed_yaml_is_named_as_the_suite_file_with_its_line(monkeypatch, capsys, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\npolicies: [random\nseeds: [0]\n")
    message = _user_error(monkeypatch, capsys, "bench", path, "--dry-run")
    assert f"suite file {path} is not valid YAML" in message
    assert f'in "{path}", line 3' in message and "<unicode string>" not in message
    path.write_text("- random\n")
    message = _user_error(monkeypatch, capsys, "bench", path)
    assert f"suite file {path} must hold a mapping, not list" in message


def test_a_dry_run_writes_nothing(monkeypatch, capsys, tmp_path):
    path = _suite_file(tmp_path, {**GRID, "datasets": GRID["datasets"][:1]})
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["maskkit", "bench", str(path), "--out", str(out), "--dry-run"])
    with pytest.raises(SystemExit) as ended:
        main()
    assert ended.value.code == 0 and " new " in capsys.readouterr().out
    assert not (tmp_path / "out").exists()  # no output dir, so no .bench.lock left behind either
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit):
        main()
    assert list((tmp_path / "out").iterdir()) == []
