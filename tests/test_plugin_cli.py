"""Third-party plugins that are really pip-installed, through the ``maskkit`` command:
``maskkit policies`` lists them (and reports the broken ones in one line each), and ``maskkit
train`` trains with them.

The CLI runs as a subprocess with ``PYTHONPATH`` pointing at a ``pip install --target`` folder
(``good_site``, ``broken_site`` in conftest.py), so the plugins are found exactly as an installed
third-party distribution would be. Those subprocesses are started together in the background
(``cli_runs``) to overlap their start-up. Whatever else is installed, these tests see only
maskkit's own plugins and the ones they install (``plugin_isolation.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from cli_helpers import BackgroundCli, CliResult, assert_one_clean_error_line, listed_policies, train_args
from plugin_packages import BUILT_INS
from safetensors.torch import load_file

from maskkit.plugins import get_registry

# --- the background runs ------------------------------------------------------------------------


class PlannedRun(NamedTuple):
    """A background CLI run: the tests that read it, its arguments and environment."""

    tests: tuple[str, ...]
    args: list[str]
    site: Path | None = None  # plugins the CLI sees
    columns: int | None = 250  # None: COLUMNS unset, as in a pipe
    hidden_site: Path | None = None  # importable, but stands for plugins the tests must not see


def _cli_plan(good_site: Path, broken_site: Path, data_dir: Path) -> dict[str, PlannedRun]:
    plan = {
        "built-ins": PlannedRun(("test_policies_lists_the_built_ins",), ["policies"]),
        # COLUMNS unset, output to a file: as piped.
        "good": PlannedRun(
            ("test_policies_lists_installed_third_party_plugins", "test_policies_rows_stay_whole_when_piped"),
            ["policies"],
            good_site,
            None,
        ),
        "broken": PlannedRun(
            (
                "test_broken_plugins_are_reported_and_the_rest_still_load",
                "test_plugin_warnings_stay_one_line_in_a_narrow_terminal",
            ),
            ["policies"],
            broken_site,
            80,
        ),
        "json": PlannedRun(
            ("test_policies_json_lists_policies_and_failures",), ["policies", "--json"], broken_site
        ),
        "hidden": PlannedRun(
            ("test_plugins_installed_elsewhere_stay_invisible_to_the_tests",),
            ["policies"],
            hidden_site=broken_site,
        ),
    }
    for policy, test in (
        ("patch-scorer", "test_train_with_the_learned_example"),
        ("checkerboard", "test_train_with_the_checkerboard_example"),
        ("loss-aware", "test_train_with_a_third_party_policy_trained_at_the_pretrain_level"),
        ("bad-decision", "test_train_with_a_malformed_decision_fails_in_one_line"),
    ):
        plan[policy] = PlannedRun((test,), train_args(policy, data_dir, Path("run")), good_site)
    return plan


@pytest.fixture(scope="module")
def cli_runs(
    request: pytest.FixtureRequest,
    good_site: Path,
    broken_site: Path,
    data_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, BackgroundCli]]:
    """The CLI subprocesses of the selected tests, started at once, each in its own folder.

    They are mostly interpreter start-up and imports (torch, ...), so they overlap well even on
    two cores; one after the other they would take about twice as long.
    """
    selected = {item.originalname for item in request.session.items}
    root = tmp_path_factory.mktemp("cli")
    runs: dict[str, BackgroundCli] = {}
    for name, planned in _cli_plan(good_site, broken_site, data_dir).items():
        if selected.intersection(planned.tests):
            (root / name).mkdir()
            runs[name] = BackgroundCli(
                planned.args, root / name, planned.site, planned.columns, planned.hidden_site
            )
    yield runs
    for run in runs.values():
        run.stop()


def training(cli_runs: dict[str, BackgroundCli], policy: str) -> tuple[CliResult, Path]:
    """The result of the background ``maskkit train --policy POLICY`` and its run dir."""
    run = cli_runs[policy]
    return run.result(), run.cwd / "run"


# --- `maskkit policies` -------------------------------------------------------------------------


def test_policies_lists_the_built_ins(cli_runs: dict[str, BackgroundCli]) -> None:
    result = cli_runs["built-ins"].result()
    assert result.returncode == 0, result.stderr
    assert result.stderr_lines == []
    listed = listed_policies(result.stdout)
    assert set(listed) >= BUILT_INS
    for name in BUILT_INS:
        assert listed[name]["distribution"] == "maskkit"
    assert listed["random"]["learnable"] == listed["blockwise"]["learnable"] == "no"
    assert listed["mlo"]["learnable"] == listed["mlo-light"]["learnable"] == "yes"
    assert listed["hpm"]["learnable"] == "pretrain level"
    assert "none" not in listed  # no policy, but a footnote says what bench's `none` is
    assert "\nnone: a maskkit bench suite may also name this baseline" in result.stdout


def test_policies_lists_installed_third_party_plugins(cli_runs: dict[str, BackgroundCli]) -> None:
    good_listing = cli_runs["good"].result()
    assert good_listing.returncode == 0, good_listing.stderr
    assert good_listing.stderr_lines == []  # nothing is broken at load time
    listed = listed_policies(good_listing.stdout)
    assert set(listed) >= BUILT_INS
    assert listed["checkerboard"] == {"distribution": "maskkit-checkerboard", "learnable": "no", "needs": "-"}
    assert listed["patch-scorer"] == {
        "distribution": "maskkit-patch-scorer",
        "learnable": "yes",
        "needs": "-",
    }
    assert listed["bad-decision"]["distribution"] == listed["fragile"]["distribution"] == "maskkit-faulty"
    assert listed["random"]["distribution"] == "maskkit"
    assert listed["loss-aware"] == {
        "distribution": "maskkit-loss-aware",
        "learnable": "pretrain level",
        "needs": "-",
    }


def test_broken_plugins_are_reported_and_the_rest_still_load(cli_runs: dict[str, BackgroundCli]) -> None:
    result = cli_runs["broken"].result()
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    listed = listed_policies(result.stdout)
    assert set(listed) == BUILT_INS  # the broken ones provide nothing
    warnings = [line for line in result.stderr_lines if line.startswith("warning:")]
    assert len(warnings) == len(result.stderr_lines) == 2, result.stderr

    exploding = [line for line in warnings if "'exploding'" in line]
    assert len(exploding) == 1
    assert "maskkit-exploding" in exploding[0]
    assert "RuntimeError: kaboom while importing" in exploding[0]

    not_a_policy = [line for line in warnings if "'nap'" in line]
    assert len(not_a_policy) == 1
    assert "maskkit-not-a-policy" in not_a_policy[0]
    assert "not a MaskPolicy subclass" in not_a_policy[0]


def test_plugin_warnings_stay_one_line_in_a_narrow_terminal(cli_runs: dict[str, BackgroundCli]) -> None:
    result = cli_runs["broken"].result()
    assert result.returncode == 0
    assert len(result.stderr_lines) == 2, result.stderr
    assert all(line.startswith("warning:") for line in result.stderr_lines), result.stderr


def test_policies_rows_stay_whole_when_piped(cli_runs: dict[str, BackgroundCli]) -> None:
    # COLUMNS unset and stdout a file: rich would wrap the table at 80 columns.
    result = cli_runs["good"].result()
    assert result.returncode == 0, result.stderr
    listed = listed_policies(result.stdout)
    assert set(listed) >= BUILT_INS | {"checkerboard", "patch-scorer"}
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == len(listed)  # one line per policy: no continuation lines
    assert max(len(line) for line in result.stdout.splitlines()) > 80
    checkerboard = next(line for line in rows if "checkerboard" in line)
    assert "Example plugin: a randomly shifted checkerboard, topped up with random patches." in checkerboard


def test_policies_json_lists_policies_and_failures(cli_runs: dict[str, BackgroundCli]) -> None:
    result = cli_runs["json"].result()
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    by_name = {policy["name"]: policy for policy in listing["policies"]}
    assert set(by_name) == BUILT_INS
    assert by_name["mlo-light"] == {
        "name": "mlo-light",
        "distribution": "maskkit",
        "plugin": "mlo",
        "learnable": True,
        "trained_by": ["mask level"],
        "requires": [],
        "description": by_name["mlo-light"]["description"],
    }
    assert "per-patch scorer" in by_name["mlo-light"]["description"]
    assert by_name["hpm"]["trained_by"] == ["pretrain level"] and by_name["random"]["trained_by"] == []
    failures = {failure["plugin"]: failure for failure in listing["failures"]}
    assert set(failures) == {"exploding", "nap"}
    assert failures["exploding"]["distribution"] == "maskkit-exploding"
    assert failures["exploding"]["error"] == "RuntimeError: kaboom while importing"
    assert failures["nap"]["message"].startswith("plugin 'nap' from maskkit-not-a-policy failed to load")


def test_plugins_installed_elsewhere_stay_invisible_to_the_tests(
    cli_runs: dict[str, BackgroundCli], broken_site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # broken_site is importable (on PYTHONPATH / sys.path) but not one of the test's own sites:
    # it stands for plugins installed in the developer's environment.
    result = cli_runs["hidden"].result()
    assert result.returncode == 0, result.stderr
    assert set(listed_policies(result.stdout)) == BUILT_INS
    assert result.stderr_lines == []
    monkeypatch.syspath_prepend(str(broken_site))
    get_registry.cache_clear()
    assert set(get_registry().policies) == BUILT_INS
    assert get_registry().failures == []


# --- `maskkit train` with plugins ---------------------------------------------------------------


def assert_finished_run(result: CliResult, run_dir: Path, policy: str) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["policy"] == policy
    assert 0.0 <= summary["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_train_with_the_learned_example(cli_runs: dict[str, BackgroundCli]) -> None:
    result, run_dir = training(cli_runs, "patch-scorer")
    assert_finished_run(result, run_dir, "patch-scorer")
    assert "learnable, three-level MLO" in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pretrain"]["level_steps"].get("mask", 0) > 0  # the policy was trained at level 3
    assert summary["pretrain"]["evaluation_counts"].get("mask/step", 0) > 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    penalties = [record["loss/mask_regularizer"] for record in records if "loss/mask_regularizer" in record]
    assert penalties and all(value >= 0 for value in penalties)  # its regulariser, logged on its own


@pytest.mark.slow
def test_train_with_the_checkerboard_example(cli_runs: dict[str, BackgroundCli]) -> None:
    result, run_dir = training(cli_runs, "checkerboard")
    assert_finished_run(result, run_dir, "checkerboard")
    assert "fixed, pretrain level only" in result.stdout


@pytest.mark.slow
def test_train_with_a_third_party_policy_trained_at_the_pretrain_level(
    cli_runs: dict[str, BackgroundCli],
) -> None:
    result, run_dir = training(cli_runs, "loss-aware")
    assert_finished_run(result, run_dir, "loss-aware")
    assert "its own parameters trained with the MAE" in " ".join(result.stdout.split())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss/policy_pretrain"] for record in records if "loss/policy_pretrain" in record]
    assert len(losses) == 8 and all(loss > 0 for loss in losses)  # every step of the smoke preset
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pretrain"]["level_steps"] == {"pretrain": 8}  # no level 3
    pretrained = json.loads((run_dir / "checkpoints" / "pretrained.json").read_text())["dir"]
    weights = load_file(run_dir / "checkpoints" / pretrained / "policy.safetensors")
    assert weights["predictor.weight"].abs().sum() > 0  # zero at the start: the hook trained it


@pytest.mark.slow
def test_train_with_a_malformed_decision_fails_in_one_line(cli_runs: dict[str, BackgroundCli]) -> None:
    result, _ = training(cli_runs, "bad-decision")
    assert_one_clean_error_line(result, "'bad-decision'", "malformed decision", "int32")
