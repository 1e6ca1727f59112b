"""Fixtures every test gets (a plugin view isolated from whatever else is installed), and those
several test modules share: the tiny DermaMNIST, the pip-installed third-party plugins."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import write_medmnist_npz
from plugin_isolation import filtered_entry_points
from plugin_packages import (
    CHECKERBOARD_SOURCE,
    EXPLODING,
    FAULTY,
    LOSS_AWARE,
    NOT_A_POLICY,
    PATCH_SCORER_SOURCE,
    copy_project,
    pip_install_target,
    write_package,
)

from maskkit.plugins import get_registry


@pytest.fixture(autouse=True)
def plugin_sites(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Only maskkit's own plugins are visible, plus those under the folders a test appends here.

    The plugin registry is cached per process; it is cleared around every test so that no test
    sees another's plugins (or the unfiltered environment's).
    """
    sites: list[Path] = []
    monkeypatch.setattr(
        importlib.metadata, "entry_points", filtered_entry_points(importlib.metadata.entry_points, sites)
    )
    get_registry.cache_clear()
    yield sites
    get_registry.cache_clear()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a tiny fake ``dermamnist.npz`` (MedMNIST's layout), one per test module;
    a module that needs other split sizes defines its own ``data_dir``."""
    folder = tmp_path_factory.mktemp("data")
    write_medmnist_npz(folder / "dermamnist.npz")
    return folder


@pytest.fixture(scope="session")
def good_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``maskkit-faulty``, ``maskkit-loss-aware`` and the two examples, ``maskkit-checkerboard`` and
    ``maskkit-patch-scorer``, installed as the tutorial says (``pip install ./examples/<plugin>``,
    here into a target folder); once per session, for every module that uses them."""
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


@pytest.fixture(scope="session")
def broken_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``maskkit-exploding`` fails at import; ``maskkit-not-a-policy``'s hook returns a non-policy."""
    root = tmp_path_factory.mktemp("broken")
    projects = [
        write_package(root / "exploding", "maskkit-exploding", {"exploding": "boom"}, {"boom": EXPLODING}),
        write_package(root / "nap", "maskkit-not-a-policy", {"nap": "hooks"}, {"hooks": NOT_A_POLICY}),
    ]
    pip_install_target(projects, root / "site")
    return root / "site"
