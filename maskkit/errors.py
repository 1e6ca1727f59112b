"""Errors a user can cause. The CLI turns each into one readable line and exit code 2."""

from __future__ import annotations


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
        super().__init__(f"unknown {kind} '{name}'. Available: {listing}." + (f" {note}" if note else ""))
        self.kind, self.name, self.available = kind, name, available


class TrainingDivergedError(MaskkitError):
    """A non-finite loss: the run stops, keeping the last good checkpoint."""
