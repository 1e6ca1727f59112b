"""Errors a user can cause. The CLI turns each into one readable line and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MaskkitError(Exception):
    """A problem the user can fix: a bad name, a bad value, missing data, a broken plugin.

    The message says what is wrong and how to fix it. The CLI prints it without a traceback.
    """


class ConfigError(MaskkitError):
    """An invalid configuration value, an unknown key or an unreadable config file."""


class DataError(MaskkitError):
    """A dataset that is missing, truncated, of the wrong shape, or cannot be downloaded."""


class PluginError(MaskkitError):
    """A plugin that fails to import, to register, to construct, or returns a malformed result."""


class UnknownNameError(MaskkitError):
    """A name (policy, dataset, preset) that nothing provides."""

    def __init__(self, kind: str, name: str, available: list[str], note: str = "") -> None:
        listing = ", ".join(sorted(available)) or "(none installed)"
        nearest = closest_name(name, available)
        suggestion = f" Did you mean '{nearest}'?" if nearest else ""
        super().__init__(
            f"unknown {kind} '{name}'.{suggestion} Available: {listing}." + (f" {note}" if note else "")
        )
        self.kind, self.name, self.available, self.nearest = kind, name, available, nearest


def closest_name(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate spelled most like ``name`` (case ignored), or None when none is close.

    Every "did you mean" of maskkit comes from here: :func:`difflib.get_close_matches` with its
    default cutoff (a similarity ratio of 0.6), so ``radnom`` finds ``random`` and ``nosuch``
    finds nothing.
    """
    by_folded = {candidate.lower(): candidate for candidate in candidates}
    matches = difflib.get_close_matches(str(name).strip().lower(), list(by_folded), n=1)
    return by_folded[matches[0]] if matches else None


class TrainingDivergedError(MaskkitError):
    """A non-finite loss: the run stops, keeping the last good checkpoint."""


class DamagedFileError(MaskkitError):
    """A file maskkit wrote that no longer reads back: truncated, overwritten, not what it should be.

    The message names the file, what is wrong with it and what to do:
    ``<path> is damaged (<problem>); <fix>``.
    """

    def __init__(self, path: object, problem: str, fix: str) -> None:
        super().__init__(f"{path} is damaged ({problem}); {fix}")
        self.path, self.problem, self.fix = path, problem, fix


class MaskkitWarning(UserWarning):
    """Something the user should change but that does not stop the run (an old config key).

    The CLI prints each as one line, ``warning: <message>``, once per process."""


def warn_once(message: str) -> None:
    """Warn with :class:`MaskkitWarning` (shown once per distinct message)."""
    import warnings

    warnings.warn(message, MaskkitWarning, stacklevel=3)
