"""Plugins: discovery through the ``maskkit`` entry-point group, third-party packages that are
really pip-installed, and how broken plugins are reported.

The CLI runs as a subprocess with ``PYTHONPATH`` pointing at a ``pip install --target`` folder,
so the plugins are found exactly as an installed third-party distribution would be. Those
subprocesses are started together in the background (``cli_runs``) to overlap their start-up.
Errors raised before any training are checked in-process through ``maskkit.cli.main()``, and the
registry itself with fake entry points.
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

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import maskkit.plugins as plugins_module
from maskkit import cli
from maskkit.errors import PluginError, UnknownNameError
from maskkit.hookspecs import hookimpl
from maskkit.plugins import PluginFailure, create_policy, get_registry, policy_info
from maskkit.policy import MaskBatch, MaskDecision, MaskPolicy, PolicyContext, decision_from_scores

REPO = Path(__file__).resolve().parents[1]
CHECKERBOARD_SOURCE = REPO / "examples" / "maskkit-checkerboard"
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

    def __init__(self, args: list[str], cwd: Path, site: Path | None = None, columns: int = 250) -> None:
        env = {key: value for key, value in os.environ.items() if key not in {"PYTHONPATH", "FORCE_COLOR"}}
        env.pop("MASKKIT_DATA_DIR", None)
        if site is not None:
            env["PYTHONPATH"] = str(site)
        env["COLUMNS"] = str(columns)  # a wide table: one row per line
        env["PYTHONWARNINGS"] = "ignore"  # stderr is checked line by line
        env["OMP_NUM_THREADS"] = "1"  # several runs share a few cores
        # files that outlive this call; closed when the object goes
        self.stdout = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.cwd = cwd
        self.process = subprocess.Popen(
            [sys.executable, "-m", "maskkit.cli", *args],
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

# A learnable third-party policy: a per-position logit plus a little noise; it also overrides
# the regularizer, so the whole level-3 path is exercised for a plugin.
POSITION_BIAS = """
    from __future__ import annotations

    import torch
    from torch import nn

    from maskkit.hookspecs import hookimpl
    from maskkit.policy import MaskPolicy, decision_from_scores


    class PositionBiasMasking(MaskPolicy):
        name = "position-bias"
        description = "Test plugin: a learned logit per patch position."
        learnable = True

        def __init__(self, context, noise: float = 0.1):
            super().__init__(context)
            self.noise = noise
            self.logits = nn.Parameter(torch.zeros(context.num_patches))  # [L]

        def forward(self, batch):
            tokens = batch.tokens  # [B, L, D]
            noise = self.noise * torch.randn(tokens.shape[:2], device=tokens.device)
            prob = (self.logits + noise).sigmoid()  # [B, L]
            return decision_from_scores(prob, batch.mask_ratio, weights=prob)

        def regularizer(self, decision, batch):
            return (decision.weights.mean() - batch.mask_ratio) ** 2


    @hookimpl
    def maskkit_policies():
        return [PositionBiasMasking]
"""

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


    @hookimpl
    def maskkit_policies():
        return [BadDecision, Fragile]
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
    """``maskkit-position-bias``, ``maskkit-faulty``, ``maskkit-loss-aware`` and the example
    ``maskkit-checkerboard``."""
    root = tmp_path_factory.mktemp("good")
    projects = [
        write_package(
            root / "position-bias",
            "maskkit-position-bias",
            {"position-bias": "policy"},
            {"policy": POSITION_BIAS},
        ),
        write_package(root / "faulty", "maskkit-faulty", {"faulty": "policies"}, {"policies": FAULTY}),
        write_package(
            root / "loss-aware", "maskkit-loss-aware", {"loss-aware": "policy"}, {"policy": LOSS_AWARE}
        ),
        copy_project(CHECKERBOARD_SOURCE, root / "checkerboard"),
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


# The background CLI runs: name → (the test that reads it, arguments, site, terminal columns).
def _cli_plan(
    good_site: Path, broken_site: Path, data_dir: Path
) -> dict[str, tuple[str, list[str], Path | None, int]]:
    plan: dict[str, tuple[str, list[str], Path | None, int]] = {
        "built-ins": ("test_policies_lists_the_built_ins", ["policies"], None, 250),
        "good": ("test_policies_lists_installed_third_party_plugins", ["policies"], good_site, 250),
        "broken": (
            "test_broken_plugins_are_reported_and_the_rest_still_load",
            ["policies"],
            broken_site,
            250,
        ),
        "narrow": ("test_plugin_warnings_stay_one_line_in_a_narrow_terminal", ["policies"], broken_site, 80),
    }
    for policy, test in (
        ("position-bias", "test_train_with_a_learnable_third_party_plugin"),
        ("checkerboard", "test_train_with_the_checkerboard_example"),
        ("loss-aware", "test_train_with_a_third_party_policy_trained_at_the_pretrain_level"),
        ("bad-decision", "test_train_with_a_malformed_decision_fails_in_one_line"),
    ):
        plan[policy] = (test, train_args(policy, data_dir, Path("run")), good_site, 250)
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
    for name, (test, args, site, columns) in _cli_plan(good_site, broken_site, data_dir).items():
        if test in selected:
            (root / name).mkdir()
            runs[name] = BackgroundCli(args, root / name, site, columns)
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


def test_policies_lists_installed_third_party_plugins(cli_runs: dict[str, BackgroundCli]) -> None:
    good_listing = cli_runs["good"].result()
    assert good_listing.returncode == 0, good_listing.stderr
    assert good_listing.stderr_lines == []  # nothing is broken at load time
    listed = listed_policies(good_listing.stdout)
    assert set(listed) >= BUILT_INS
    assert listed["checkerboard"] == {"distribution": "maskkit-checkerboard", "learnable": "no", "needs": "-"}
    assert listed["position-bias"]["distribution"] == "maskkit-position-bias"
    assert listed["position-bias"]["learnable"] == "yes"
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
    result = cli_runs["narrow"].result()
    assert result.returncode == 0
    assert len(result.stderr_lines) == 2, result.stderr
    assert all(line.startswith("warning:") for line in result.stderr_lines), result.stderr


# --- `maskkit train` with plugins ---------------------------------------------------------------


def assert_finished_run(result: CliResult, run_dir: Path, policy: str) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["policy"] == policy
    assert 0.0 <= summary["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_train_with_a_learnable_third_party_plugin(cli_runs: dict[str, BackgroundCli]) -> None:
    result, run_dir = training(cli_runs, "position-bias")
    assert_finished_run(result, run_dir, "position-bias")
    assert "learnable, three-level MLO" in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pretrain"]["level_steps"].get("mask", 0) > 0  # the policy was trained at level 3
    assert summary["pretrain"]["evaluation_counts"].get("mask/step", 0) > 0


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
def registry_with(monkeypatch: pytest.MonkeyPatch):
    """Put a ``--target`` site on ``sys.path`` for the in-process registry; clear its cache around."""

    def add(site: Path) -> None:
        monkeypatch.syspath_prepend(str(site))
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
        FakeEntryPoint("later-duplicate", lambda: plugin_module("dup", make_policy("alpha")), "dist-dup"),
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
    fake_entry_points(
        FakeEntryPoint("shared", lambda: plugin_module("first", make_policy("alpha")), "dist-first"),
        FakeEntryPoint("shared", lambda: plugin_module("second", make_policy("beta")), "dist-second"),
    )
    registry = get_registry()
    assert set(registry.policies) == {"alpha"}
    assert [failure.distribution for failure in registry.failures] == ["dist-second"]


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
