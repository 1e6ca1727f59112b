"""Where datasets live on disk, and how a user points maskkit at them."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_DIR_ENV", "default_data_dir", "point_at_data_hint"]

#: Environment variable that overrides the default data folder.
DATA_DIR_ENV = "MASKKIT_DATA_DIR"


def default_data_dir() -> Path:
    """The folder datasets are read from (and downloaded to) when none is given.

    ``$MASKKIT_DATA_DIR`` if it is set and non-empty, else ``<user cache dir>/maskkit/data``
    (``platformdirs.user_cache_dir("maskkit") / "data"``, e.g. ``~/.cache/maskkit/data`` on
    Linux). The folder is not created.
    """
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs
    except ImportError:  # a declared dependency; fall back to the XDG layout it would give
        cache = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
        return Path(cache).expanduser() / "maskkit" / "data"
    return Path(platformdirs.user_cache_dir("maskkit")) / "data"


def point_at_data_hint(what: str, *, downloadable: bool) -> str:
    """The sentence telling the user how to make ``what`` available.

    Args:
        what: the thing that is needed, e.g. ``"it"`` or ``"a folder holding it"``.
        downloadable: whether ``--download`` can fetch it.
    """
    point = f"point --data-dir (or the {DATA_DIR_ENV} environment variable) at a folder holding {what}"
    if downloadable:
        return f"Pass --download to fetch it, or {point}."
    return point[0].upper() + point[1:] + "."
