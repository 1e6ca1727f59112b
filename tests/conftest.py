"""Fixtures every test gets: a plugin view isolated from whatever else is installed."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import write_medmnist_npz
from plugin_isolation import filtered_entry_points

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
