"""Plugins: discovery through the ``maskkit`` entry-point group, third-party packages that are
really pip-installed, and how broken plugins are reported.

The CLI runs as a subprocess with ``PYTHONPATH`` pointing at a ``pip install --target`` folder,
so the plugins are found exactly as an installed third-party distribution would be. Those
subprocesses are started together in the background (``cli_runs``) to overlap their start-up.
Errors raised before any training are checked in-process through ``maskkit.cli.main()``, and the
registry itself with fake entry points.

Whatever else is installed, these tests see only maskkit's own plugins and the ones they install
(``plugin_isolation.py``: the ``plugin_sites`` fixture in-process, ``isolated_cli.py`` in a
subprocess).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from helpers import MASKKIT_CLI
from plugin_isolation import SITES_VARIABLE
from safetensors.torch import load_file

import maskkit.plugins as plugins_module
from maskkit import cli
from maskkit.errors import PluginError, UnknownNameError
from maskkit.hookspecs import hookimpl
from maskkit.plugins import NameClash, PluginFailure, create_policy, get_registry, policy_info
from maskkit.policy import MaskBatch, MaskDecision, MaskPolicy, PolicyContext, decision_from_scores

REPO = Path(__file__).resolve().parents[1]
CHECKERBOARD_SOURCE = REPO / "examples" / "maskkit-checkerboard"
PATCH_SCORER_SOURCE = REPO / "examples" / "maskkit-patch-scorer"
BUILT_INS = {
    "random",
    "mlo",
    "mlo-light",
    "blockwise",
    "hpm",
    *(
        f"{name}{suffix}"
        for name in ("semantic-soft", "region-ratio", "constraint")
        for suffix in ("", "-fixed")
    ),
}

# --- helpers ------------------------------------------------------------------------------------


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


class BackgroundCli:
    """``python -m maskkit.cli ARGS`` started in the background; :meth:`result` waits for it.

    Output goes to temporary files, not pipes, so a chatty run never blocks on a full pipe.
    """

    def __init__(
        self,
        args: list[str],
        cwd: Path,
        site: Path | None = None,
        columns: int | None = 250,
        hidden_site: Path | None = None,
    ) -> None:
        env = {key: value for key, value in os.environ.items() if key not in {"PYTHONPATH", "FORCE_COLOR"}}
        env.pop("MASKKIT_DATA_DIR", None)
        # ``site``'s plugins are visible to the CLI; ``hidden_site`` is importable but stands for
        # plugins installed elsewhere in the environment, which the tests must not see.
        on_path = [str(folder) for folder in (site, hidden_site) if folder is not None]
        env["PYTHONPATH"] = os.pathsep.join(on_path)
        env[SITES_VARIABLE] = str(site) if site is not None else ""
        env.pop("COLUMNS", None)
        if columns is not None:
            env["COLUMNS"] = str(columns)  # a wide table: one row per line
        env["PYTHONWARNINGS"] = "ignore"  # stderr is checked line by line
        env["OMP_NUM_THREADS"] = "1"  # several runs share a few cores
        # files that outlive this call; closed when the object goes
        self.stdout = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.cwd = cwd
        self.process = subprocess.Popen(
            [*MASKKIT_CLI, *args],
            cwd=cwd,
            env=env,
            stdout=self.stdout,
            stderr=self.stderr,
            text=True,
        )

    def result(self, timeout: float = 300) -> CliResult:
        try:
            returncode = self.process.wait(timeout=timeout)
        finally:
            self.stop()
        self.stdout.seek(0)
        self.stderr.seek(0)
        return CliResult(returncode, self.stdout.read(), self.stderr.read())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def listed_policies(stdout: str) -> dict[str, dict[str, str]]:
    """Parse the ``maskkit policies`` table: name → {distribution, learnable, needs}."""
    rows: dict[str, dict[str, str]] = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) == 5 and cells[0] and cells[0] != "name":
            rows[cells[0]] = {"distribution": cells[1], "learnable": cells[2], "needs": cells[3]}
    return rows


def write_package(
    root: Path, distribution: str, entry_points: dict[str, str], modules: dict[str, str]
) -> Path:
    """A minimal setuptools project at ``root``: one package, ``modules`` by file name."""
    package = distribution.replace("-", "_")
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    for name, source in modules.items():
        (root / package / f"{name}.py").write_text(textwrap.dedent(source))
    lines = "\n".join(f'{name} = "{package}.{module}"' for name, module in entry_points.items())
    (root / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""\
            [build-system]
            requires = ["setuptools>=68"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{distribution}"
            version = "0.0.1"
            dependencies = ["maskkit"]

            [tool.setuptools]
            packages = ["{package}"]

            [project.entry-points.maskkit]
            """
        )
        + lines
        + "\n"
    )
    return root


def pip_install_target(projects: list[Path], target: Path) -> None:
    """Really install ``projects`` into ``target``, offline and without touching the venv."""
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--quiet",
            "--target",
            str(target),
            *map(str, projects),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def copy_project(source: Path, destination: Path) -> Path:
    """Copy a project without build leftovers, so building it never writes into the repository."""
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    return destination


def write_tiny_dermamnist(data_dir: Path, sizes: tuple[int, int, int] = (64, 32, 32)) -> Path:
    """A MedMNIST-layout ``dermamnist.npz``: uint8 images ``[N, 28, 28, 3]``, labels ``[N, 1]``, 7 classes."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), sizes, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(count, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % 7).astype(np.uint8).reshape(count, 1)
    np.savez_compressed(data_dir / "dermamnist.npz", **arrays)
    return data_dir


def train_args(policy: str, data_dir: Path, run_dir: Path) -> list[str]:
    return [
        "train",
        "--policy",
        policy,
        "--dataset",
        "dermamnist",
        "--data-dir",
        str(data_dir),
        "--preset",
        "smoke",
        "--device",
        "cpu",
        "--run-dir",
        str(run_dir),
    ]


def assert_one_clean_error_line(result: CliResult, *fragments: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert len(result.stderr_lines) == 1, result.stderr
    line = result.stderr_lines[0]
    assert line.startswith("error:"), line
    for fragment in fragments:
        assert fragment in line, line
    return line


# --- plugin sources -----------------------------------------------------------------------------

# A fixed third-party policy with its own parameters trained at the pretrain level: a per-patch
# predictor of the reconstruction error (zero-initialised), regressed by the pretrain-level hook.
LOSS_AWARE = """
    from __future__ import annotations

    import torch
    from torch import nn

    from maskkit.hookspecs import hookimpl
    from maskkit.policy import MaskPolicy, decision_from_scores


    class LossAwareMasking(MaskPolicy):
        name = "loss-aware"
        description = "Test plugin: masks the patches its own predictor expects hardest."

        def __init__(self, context):
            super().__init__(context)
            self.predictor = nn.Linear(context.embed_dim, 1)
            nn.init.zeros_(self.predictor.weight)
            nn.init.zeros_(self.predictor.bias)

        def pretrain_parameters(self):
            return self.predictor.parameters()

        def forward(self, batch):
            predicted = self.predictor(batch.tokens.detach()).squeeze(-1)  # [B, L]
            noise = torch.rand(predicted.shape, device=predicted.device)
            scores = predicted.detach() + noise
            return decision_from_scores(scores, batch.mask_ratio, maps={"predicted error": predicted})

        def pretrain_loss(self, decision, batch, error):
            squared = (decision.maps["predicted error"] - error) ** 2  # [B, L]
            return (squared * decision.mask).sum() / decision.mask.sum()


    @hookimpl
    def maskkit_policies():
        return [LossAwareMasking]
"""

# Policies that load fine but break when used.
FAULTY = """
    from __future__ import annotations

    import torch

    from maskkit.hookspecs import hookimpl
    from maskkit.policy import MaskPolicy, decision_from_scores


    class BadDecision(MaskPolicy):
        name = "bad-decision"
        description = "Test plugin: returns int32 ids."

        def forward(self, batch):
            decision = decision_from_scores(torch.rand(batch.tokens.shape[:2]), batch.mask_ratio)
            decision.ids_keep = decision.ids_keep.int()
            return decision


    class Fragile(MaskPolicy):
        name = "fragile"
        description = "Test plugin: its constructor raises."

        def __init__(self, context):
            super().__init__(context)
            raise RuntimeError("the fragile policy cannot be built")

        def forward(self, batch):
            raise AssertionError("never built")


    class ShapeBug(MaskPolicy):
        name = "shape-bug"
        description = "Test plugin: a shape error in its forward."

        def forward(self, batch):
            scores = torch.rand(batch.tokens.shape[:2])  # [B, L]
            return decision_from_scores(scores[:, :-1] + scores, batch.mask_ratio)  # the bug


    class LateFailure(MaskPolicy):
        name = "late-failure"
        description = "Test plugin: its forward raises from its fail_at-th call on."

        def __init__(self, context, fail_at: int = 3):
            super().__init__(context)
            self.fail_at, self.calls = fail_at, 0

        def forward(self, batch):
            self.calls += 1
            if self.calls >= self.fail_at:
                raise ValueError(f"out of luck at call {self.calls}")
            return decision_from_scores(torch.rand(batch.tokens.shape[:2]), batch.mask_ratio)


    @hookimpl
    def maskkit_policies():
        return [BadDecision, Fragile, ShapeBug, LateFailure]
"""

EXPLODING = """
    raise RuntimeError("kaboom while importing")
"""

NOT_A_POLICY = """
    from maskkit.hookspecs import hookimpl


    class NotAPolicy:
        name = "not-a-policy"


    @hookimpl
    def maskkit_policies():
        return [NotAPolicy]
"""

# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dermamnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def good_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``maskkit-faulty``, ``maskkit-loss-aware`` and the two examples, ``maskkit-checkerboard`` and
    ``maskkit-patch-scorer``, installed as the tutorial says (``pip install ./examples/<plugin>``,
    here into a target folder)."""
    root = tmp_path_factory.mktemp("good")
    projects = [
        write_package(root / "faulty", "maskkit-faulty", {"faulty": "policies"}, {"policies": FAULTY}),
        write_package(
            root / "loss-aware", "maskkit-loss-aware", {"loss-aware": "policy"}, {"policy": LOSS_AWARE}
        ),
        copy_project(CHECKERBOARD_SOURCE, root / "checkerboard"),
        copy_project(PATCH_SCORER_SOURCE, root / "patch-scorer"),
    ]
    pip_install_target(projects, root / "site")
    return root / "site"


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``maskkit-exploding`` fails at import; ``maskkit-not-a-policy``'s hook returns a non-policy."""
    root = tmp_path_factory.mktemp("broken")
    projects = [
        write_package(root / "exploding", "maskkit-exploding", {"exploding": "boom"}, {"boom": EXPLODING}),
        write_package(root / "nap", "maskkit-not-a-policy", {"nap": "hooks"}, {"hooks": NOT_A_POLICY}),
    ]
    pip_install_target(projects, root / "site")
    return root / "site"


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


def run_cli_in_process(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> CliResult:
    """``maskkit.cli.main()`` in this process: the same error handling, without a fresh interpreter."""
    monkeypatch.setattr(sys, "argv", ["maskkit", *args])
    monkeypatch.setenv("COLUMNS", "250")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.main()
    captured = capsys.readouterr()
    return CliResult(int(exited.value.code or 0), captured.out, captured.err)


@pytest.fixture
def registry_with(monkeypatch: pytest.MonkeyPatch, plugin_sites: list[Path]):
    """Put a ``--target`` site on ``sys.path`` for the in-process registry, let the tests see its
    plugins (``plugin_sites``), and clear the registry's cache around."""

    def add(site: Path) -> None:
        monkeypatch.syspath_prepend(str(site))
        plugin_sites.append(site)
        get_registry.cache_clear()

    get_registry.cache_clear()
    yield add
    monkeypatch.undo()
    get_registry.cache_clear()


def test_train_with_a_policy_whose_constructor_raises(
    good_site: Path,
    data_dir: Path,
    tmp_path: Path,
    registry_with,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry_with(good_site)
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    result = run_cli_in_process(train_args("fragile", data_dir, run_dir), capsys, monkeypatch)
    assert_one_clean_error_line(
        result, "'fragile'", "maskkit-faulty", "RuntimeError: the fragile policy cannot be built"
    )
    assert not run_dir.exists()


def test_an_exception_in_a_plugins_forward_is_one_line_and_leaves_no_run_dir(
    good_site: Path,
    data_dir: Path,
    tmp_path: Path,
    registry_with,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry_with(good_site)
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    for attempt in range(2):  # the same --run-dir again: the same error, not "already holds files"
        result = run_cli_in_process(train_args("shape-bug", data_dir, run_dir), capsys, monkeypatch)
        assert_one_clean_error_line(
            result,
            "mask policy 'shape-bug' (maskkit-faulty) raised in its forward at maskkit_faulty/policies.py:",
            "RuntimeError: The size of tensor a (15) must match the size of tensor b (16)",
            "MASKKIT_DEBUG=1",
        )
        assert not run_dir.exists(), f"attempt {attempt}: a failed first forward left {run_dir}"
    # An empty --run-dir the user made beforehand is left as it was: empty.
    run_dir.mkdir()
    result = run_cli_in_process(train_args("shape-bug", data_dir, run_dir), capsys, monkeypatch)
    assert result.returncode == 2 and run_dir.is_dir() and not any(run_dir.iterdir())


def test_maskkit_debug_prints_the_plugins_traceback(
    good_site: Path,
    data_dir: Path,
    tmp_path: Path,
    registry_with,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry_with(good_site)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MASKKIT_DEBUG", "1")
    result = run_cli_in_process(train_args("shape-bug", data_dir, tmp_path / "run"), capsys, monkeypatch)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "policies.py" in result.stderr
    assert result.stderr_lines[-1].startswith("error: mask policy 'shape-bug'")


@pytest.mark.slow
def test_a_run_that_fails_after_a_checkpoint_keeps_its_run_dir(
    good_site: Path,
    data_dir: Path,
    tmp_path: Path,
    registry_with,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry_with(good_site)
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    args = [*train_args("late-failure", data_dir, run_dir), "--set", "pretrain.checkpoint_every=1"]
    result = run_cli_in_process(args, capsys, monkeypatch)
    assert_one_clean_error_line(result, "'late-failure'", "ValueError: out of luck at call 3")
    assert (run_dir / "config.yaml").is_file()
    assert json.loads((run_dir / "checkpoints" / "last.json").read_text())["step"] == 2  # kept for --resume


def test_an_unknown_policy_names_the_plugins_that_failed_to_load(
    broken_site: Path,
    data_dir: Path,
    tmp_path: Path,
    registry_with,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry_with(broken_site)
    monkeypatch.chdir(tmp_path)
    result = run_cli_in_process(
        train_args("exploding-policy", data_dir, tmp_path / "run"), capsys, monkeypatch
    )
    line = assert_one_clean_error_line(
        result,
        f"unknown policy 'exploding-policy'. Available: {', '.join(sorted(BUILT_INS))}.",
        "2 plugins failed to load and may provide it:",
        "'exploding' from maskkit-exploding (RuntimeError: kaboom while importing)",
        "'nap' from maskkit-not-a-policy",
        "`maskkit policies` lists them",
    )
    assert "Reinstall" not in line


def test_train_with_an_unknown_policy(
    data_dir: Path,
    tmp_path: Path,
    registry_with,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    result = run_cli_in_process(train_args("nosuch", data_dir, run_dir), capsys, monkeypatch)
    line = assert_one_clean_error_line(result, "'nosuch'", "Available:")
    for name in BUILT_INS:
        assert name in line
    assert not run_dir.exists()
    assert not (tmp_path / "runs").exists()


def test_an_error_message_with_brackets_is_printed_verbatim(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = run_cli_in_process(train_args("[/x]", data_dir, tmp_path / "run"), capsys, monkeypatch)
    assert_one_clean_error_line(result, "unknown policy '[/x]'")


# --- the registry in-process, with fake entry points --------------------------------------------

CONTEXT = PolicyContext(num_patches=16, embed_dim=8, grid_size=4, patch_size=8)


@dataclass
class FakeDistribution:
    name: str


class FakeEntryPoint:
    """Just what ``get_registry`` uses of an ``importlib.metadata.EntryPoint``."""

    def __init__(self, name: str, load: Callable[[], object], distribution: str | None) -> None:
        self.name, self._load, self.group = name, load, "maskkit"
        self.value = f"fake_{name}"
        self.dist = FakeDistribution(distribution) if distribution is not None else None

    def load(self) -> object:
        return self._load()


def plugin_module(name: str, *classes: object, error: Exception | None = None) -> types.ModuleType:
    """A module whose ``maskkit_policies`` hook returns ``classes`` (or raises ``error``)."""
    module = types.ModuleType(name)

    @hookimpl
    def maskkit_policies() -> list:
        if error is not None:
            raise error
        return list(classes)

    module.maskkit_policies = maskkit_policies  # type: ignore[attr-defined]
    return module


def make_policy(policy_name: str, fail_in_constructor: bool = False) -> type[MaskPolicy]:
    class Policy(MaskPolicy):
        name = policy_name

        def __init__(self, context: PolicyContext, scale: float = 1.0) -> None:
            super().__init__(context)
            if fail_in_constructor:
                raise ValueError("bad scale")
            self.scale = scale

        def forward(self, batch: MaskBatch) -> MaskDecision:
            return decision_from_scores(torch.rand(batch.tokens.shape[:2]) * self.scale, batch.mask_ratio)

    return Policy


@pytest.fixture
def fake_entry_points(monkeypatch: pytest.MonkeyPatch):
    """Install fake entry points; the cached registry is cleared before and after."""

    def install(*entry_points: FakeEntryPoint) -> None:
        def entry_points_for(group: str | None = None, **_: object) -> list[FakeEntryPoint]:
            return list(entry_points) if group == "maskkit" else []

        monkeypatch.setattr(plugins_module.importlib.metadata, "entry_points", entry_points_for)
        get_registry.cache_clear()

    get_registry.cache_clear()
    yield install
    monkeypatch.undo()
    get_registry.cache_clear()


def test_registry_isolates_each_kind_of_broken_plugin(fake_entry_points) -> None:
    def explode() -> object:
        raise ImportError("No module named 'numpyy'")

    fake_entry_points(
        FakeEntryPoint("good", lambda: plugin_module("good", make_policy("alpha")), "dist-good"),
        FakeEntryPoint("import-error", explode, "dist-import"),
        FakeEntryPoint("wrong-type", lambda: plugin_module("wrong", int), "dist-wrong"),
        FakeEntryPoint(
            "raises", lambda: plugin_module("raises", error=RuntimeError("hook broke")), "dist-raise"
        ),
        FakeEntryPoint("later-duplicate", lambda: plugin_module("dup", make_policy("alpha")), "dist-later"),
        FakeEntryPoint("nameless", lambda: plugin_module("nameless", type("X", (MaskPolicy,), {})), None),
    )
    registry = get_registry()
    assert set(registry.policies) == {"alpha"}
    assert registry.policies["alpha"].distribution == "dist-good"
    assert registry.policies["alpha"].plugin == "good"

    failures = {failure.entry_point: failure for failure in registry.failures}
    assert set(failures) == {"import-error", "wrong-type", "raises", "later-duplicate", "nameless"}
    assert failures["import-error"] == PluginFailure(
        "import-error", "dist-import", "ImportError: No module named 'numpyy'"
    )
    assert "not a MaskPolicy subclass" in failures["wrong-type"].error
    assert failures["raises"].error == "RuntimeError: hook broke"
    assert "already provided by dist-good" in failures["later-duplicate"].error
    assert "no string 'name'" in failures["nameless"].error
    assert failures["nameless"].distribution == "unknown distribution"
    for failure in registry.failures:
        line = failure.one_line()
        assert "\n" not in line
        assert f"'{failure.entry_point}'" in line and failure.distribution in line


def test_an_entry_point_name_clash_between_distributions_is_reported(fake_entry_points) -> None:
    fake_entry_points(  # listed in the "wrong" order: the rule, not discovery order, decides
        FakeEntryPoint("shared", lambda: plugin_module("second", make_policy("beta")), "dist-second"),
        FakeEntryPoint("shared", lambda: plugin_module("first", make_policy("alpha")), "dist-first"),
    )
    registry = get_registry()
    assert set(registry.policies) == {"alpha"}
    (clash,) = registry.failures
    assert isinstance(clash, NameClash) and clash.distribution == "dist-second"
    line = clash.one_line()
    assert "plugin 'shared' from dist-second is not loaded: dist-first already uses" in line
    assert "Rename the entry point in dist-second's pyproject.toml ([project.entry-points.maskkit])" in line
    assert "failed to load" not in line and "Reinstall or uninstall" not in line


def test_a_policy_name_clash_says_which_wins_and_what_to_rename(fake_entry_points) -> None:
    fake_entry_points(
        FakeEntryPoint(
            "zeta-plugin",
            lambda: plugin_module("z", make_policy("alpha"), make_policy("gamma")),
            "maskkit-zeta",
        ),
        FakeEntryPoint("beta-plugin", lambda: plugin_module("b", make_policy("alpha")), "maskkit-beta"),
        # A third party can never take a built-in's name, even one that sorts first.
        FakeEntryPoint("aaa", lambda: plugin_module("a", make_policy("random")), "aaa-masks"),
        FakeEntryPoint("random", lambda: plugin_module("r", make_policy("random")), "maskkit"),
    )
    registry = get_registry()
    # The rule: maskkit's own first, then by distribution name (maskkit-beta < maskkit-zeta).
    assert registry.policies["alpha"].distribution == "maskkit-beta"
    assert registry.policies["random"].distribution == "maskkit"
    assert registry.policies["gamma"].distribution == "maskkit-zeta"  # the loser's other policies load
    clashes = {failure.name: failure for failure in registry.failures}
    assert set(clashes) == {"alpha", "random"} and all(isinstance(c, NameClash) for c in clashes.values())
    line = clashes["alpha"].one_line()
    assert line.startswith(
        "policy name 'alpha' is provided by both maskkit-beta and maskkit-zeta (plugin 'zeta-plugin'); "
        "maskkit-beta's is used (maskkit's own plugins load first, then the others by distribution name"
    )
    assert "give its class another `name` there and reinstall it" in line
    assert "failed to load" not in line and "Reinstall or uninstall" not in line
    assert "is provided by both maskkit and aaa-masks" in clashes["random"].one_line()
    # A clash is not a load failure: an unknown name does not blame it.
    with pytest.raises(UnknownNameError) as caught:
        policy_info("nosuch")
    assert "failed to load" not in str(caught.value)


def test_registry_is_cached_until_cleared(fake_entry_points) -> None:
    fake_entry_points(FakeEntryPoint("one", lambda: plugin_module("one", make_policy("first")), "d1"))
    assert get_registry() is get_registry()
    assert set(get_registry().policies) == {"first"}
    fake_entry_points(FakeEntryPoint("two", lambda: plugin_module("two", make_policy("second")), "d2"))
    assert set(get_registry().policies) == {"second"}


def test_unknown_and_unbuildable_policies_raise_user_errors(fake_entry_points) -> None:
    fake_entry_points(
        FakeEntryPoint("good", lambda: plugin_module("good", make_policy("alpha")), "dist-good"),
        FakeEntryPoint("bad", lambda: plugin_module("bad", make_policy("beta", True)), "dist-bad"),
    )
    with pytest.raises(UnknownNameError, match=r"unknown policy 'nosuch'\. Available: alpha, beta\."):
        policy_info("nosuch")
    with pytest.raises(
        PluginError, match=r"policy 'beta' \(dist-bad\) failed to construct: ValueError: bad scale"
    ):
        create_policy("beta", CONTEXT)
    with pytest.raises(PluginError, match=r"policy 'alpha' \(dist-good\) rejected its options \{'nope': 1\}"):
        create_policy("alpha", CONTEXT, {"nope": 1})
    policy = create_policy("alpha", CONTEXT, {"scale": 2.0})
    assert policy.scale == 2.0 and policy.context == CONTEXT


def test_the_real_registry_holds_the_built_ins() -> None:
    get_registry.cache_clear()
    try:
        registry = get_registry()
        assert set(registry.policies) >= BUILT_INS
        assert registry.failures == []
        for name in BUILT_INS:
            assert registry.policies[name].distribution == "maskkit"
        assert registry.policies["random"].plugin == "random"
        assert registry.policies["mlo-light"].plugin == "mlo"
    finally:
        get_registry.cache_clear()


# --- the checkerboard example, in-process -------------------------------------------------------


def test_checkerboard_policy_follows_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(CHECKERBOARD_SOURCE))
    from maskkit_checkerboard.policy import CheckerboardMasking, maskkit_policies

    from maskkit.policy import validate_decision

    assert maskkit_policies() == [CheckerboardMasking]
    assert not CheckerboardMasking.learnable and CheckerboardMasking.requires == frozenset()
    torch.manual_seed(0)
    policy = CheckerboardMasking(CONTEXT)
    tokens = torch.randn(64, 16, 8)
    boards = set()
    for ratio in (0.5, 0.75, 0.25, 0.0):
        batch = MaskBatch(images=torch.zeros(64, 3, 32, 32), tokens=tokens, mask_ratio=ratio)
        decision = policy(batch)
        validate_decision(decision, batch, "checkerboard")
        grid = decision.mask.view(64, 4, 4)
        if ratio == 0.5:  # exactly a checkerboard, one of its two shifts
            assert bool((grid[:, :, 1:] != grid[:, :, :-1]).all())
            assert bool((grid[:, 1:, :] != grid[:, :-1, :]).all())
            boards = {tuple(row.tolist()) for row in decision.mask}
        if ratio == 0.75:  # a full checkerboard and a random half of the rest
            parity = (torch.arange(4).view(4, 1) + torch.arange(4).view(1, 4)) % 2
            masked_dark = (grid * parity).sum(dim=(1, 2))
            masked_light = (grid * (1 - parity)).sum(dim=(1, 2))
            assert bool((torch.maximum(masked_dark, masked_light) == 8).all())
    assert len(boards) == 2  # the shift varies across images
    with pytest.raises(ValueError, match="cell_size"):
        CheckerboardMasking(CONTEXT, cell_size=0)
    coarse = CheckerboardMasking(CONTEXT, cell_size=2)
    batch = MaskBatch(images=torch.zeros(8, 3, 32, 32), tokens=tokens[:8], mask_ratio=0.5)
    validate_decision(coarse(batch), batch, "checkerboard")


def test_patch_scorer_follows_the_contract_and_trains_through_weights_and_regularizer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(PATCH_SCORER_SOURCE))
    from maskkit_patch_scorer.policy import PatchScorerMasking, maskkit_policies

    from maskkit.policy import validate_decision

    assert maskkit_policies() == [PatchScorerMasking]
    assert PatchScorerMasking.learnable and PatchScorerMasking.requires == frozenset()
    torch.manual_seed(0)
    policy = PatchScorerMasking(CONTEXT)
    assert sum(p.numel() for p in policy.parameters()) == CONTEXT.embed_dim + 1 + CONTEXT.num_patches
    batch = MaskBatch(images=torch.zeros(6, 3, 32, 32), tokens=torch.randn(6, 16, 8), mask_ratio=0.75)
    decision = policy(batch)
    validate_decision(decision, batch, "patch-scorer")
    assert decision.weights is not None and bool(((decision.weights > 0) & (decision.weights < 1)).all())
    # The masked patches are the most probable ones.
    masked_prob = decision.weights[decision.mask == 1].view(6, -1).min(dim=1).values
    kept_prob = decision.weights[decision.mask == 0].view(6, -1).max(dim=1).values
    assert bool((masked_prob >= kept_prob).all())
    # Gradient reaches every parameter through the weights (the hypergradient's only path) …
    (decision.weights * torch.rand(6, 16)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    policy.zero_grad()
    # … and through the regulariser, a scalar that is zero when the mean probability is r.
    penalty = policy.regularizer(policy(batch), batch)
    assert penalty.shape == () and float(penalty.detach()) >= 0
    penalty.backward()
    assert policy.position_bias.grad is not None and policy.position_bias.grad.abs().sum() > 0
    # The position bias runs row-major over the grid: a large bias at (row 1, column 2) masks it.
    with torch.no_grad():
        policy.position_bias[1 * CONTEXT.grid_size + 2] = 50.0
    assert bool((policy(batch).mask.view(6, 4, 4)[:, 1, 2] == 1).all())


def test_patch_scorer_options_arrive_as_yaml_parsed_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(PATCH_SCORER_SOURCE))
    from maskkit_patch_scorer.policy import PatchScorerMasking

    from maskkit.config import parse_override

    # `--set policy_options.balance=1e-1` gives the string "1e-1" (YAML 1.1 wants a dot).
    options = parse_override("policy_options.balance=1e-1")["policy_options"]
    assert options == {"balance": "1e-1"}
    assert PatchScorerMasking(CONTEXT, **options).balance == pytest.approx(0.1)
    assert parse_override("policy_options.temperature=2")["policy_options"]["temperature"] == 2
    with pytest.raises(ValueError, match="temperature must be > 0"):
        PatchScorerMasking(CONTEXT, temperature=0)
    with pytest.raises(ValueError, match="balance must be >= 0"):
        PatchScorerMasking(CONTEXT, balance=-1)
