"""Plugins as the tests install them: really pip-installed packages (the sources of the
third-party plugins the tests use, the two examples), and fake entry points for the registry;
and the built-in policies, read from their modules."""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from maskkit.hookspecs import hookimpl
from maskkit.policy import MaskBatch, MaskDecision, MaskPolicy, PolicyContext, decision_from_scores

REPO = Path(__file__).resolve().parents[1]
CHECKERBOARD_SOURCE = REPO / "examples" / "maskkit-checkerboard"
PATCH_SCORER_SOURCE = REPO / "examples" / "maskkit-patch-scorer"


def built_in_policies() -> set[str]:
    """The names of the policies maskkit's own plugin modules (``maskkit_plugins``) provide, read
    from the modules' hooks themselves rather than through the entry points, so that a module
    whose entry point is missing from ``pyproject.toml`` shows up as missing."""
    import maskkit_plugins

    names: set[str] = set()
    for found in pkgutil.iter_modules(maskkit_plugins.__path__):
        module = importlib.import_module(f"maskkit_plugins.{found.name}")
        hook = getattr(module, "maskkit_policies", None)
        if hook is not None:
            names |= {policy.name for policy in hook()}
    return names


#: Every built-in policy, as :func:`built_in_policies` reads them.
BUILT_INS = frozenset(built_in_policies())

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


# --- installing them ----------------------------------------------------------------------------


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


# --- fake entry points, for the registry in-process ---------------------------------------------


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
