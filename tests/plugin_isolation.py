"""Tests see maskkit's own plugins and the ones a test installs, never the rest of the environment.

A maskkit plugin installed in the developer's (or CI's) environment would otherwise show up in
``maskkit policies``, add warnings, or clash with a test's plugin. :func:`isolate_entry_points`
replaces ``importlib.metadata.entry_points`` so that the ``maskkit`` group holds only the entry
points of the ``maskkit`` distribution itself and of distributions installed under one of the
allowed site folders (the ``pip install --target`` folders a test builds). Other groups pass
through unchanged.

In-process tests get this from the autouse fixture in ``conftest.py``; CLI subprocesses run
``isolated_cli.py``, which applies it from the ``MASKKIT_TEST_PLUGIN_SITES`` environment variable
before handing over to ``maskkit.cli.main``.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable, Iterable
from pathlib import Path

GROUP = "maskkit"
SITES_VARIABLE = "MASKKIT_TEST_PLUGIN_SITES"
OWN_DISTRIBUTION = "maskkit"


def _site_of(entry_point: importlib.metadata.EntryPoint) -> Path | None:
    """The folder a distribution is installed in (its ``*.dist-info``'s parent), if known."""
    dist = getattr(entry_point, "dist", None)
    if dist is None or not hasattr(dist, "locate_file"):
        return None
    try:
        return Path(str(dist.locate_file(""))).resolve()
    except (OSError, TypeError, NotImplementedError):
        return None


def is_visible(entry_point: importlib.metadata.EntryPoint, sites: Iterable[Path]) -> bool:
    """Whether a test may see ``entry_point``: maskkit's own, or installed under one of ``sites``."""
    dist = getattr(entry_point, "dist", None)
    if dist is not None and dist.name == OWN_DISTRIBUTION:
        return True
    site = _site_of(entry_point)
    return site is not None and any(site == Path(allowed).resolve() for allowed in sites)


def filtered_entry_points(original: Callable, sites: list[Path]) -> Callable:
    """``importlib.metadata.entry_points`` with the ``maskkit`` group cut down to what is visible.

    ``sites`` is read at every call, so a test can allow a folder after the patch is in place.
    """

    def entry_points(**selection):
        found = original(**selection)
        if selection.get("group") != GROUP:
            return found
        return importlib.metadata.EntryPoints(ep for ep in found if is_visible(ep, sites))

    return entry_points


def isolate_entry_points(sites: list[Path]) -> Callable:
    """Patch ``importlib.metadata.entry_points`` for this process; returns the original."""
    original = importlib.metadata.entry_points
    importlib.metadata.entry_points = filtered_entry_points(original, sites)
    return original


def sites_from_environment() -> list[Path]:
    """The allowed sites a parent test passed to a CLI subprocess."""
    value = os.environ.get(SITES_VARIABLE, "")
    return [Path(part) for part in value.split(os.pathsep) if part]
