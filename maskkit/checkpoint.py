"""Atomic checkpoints: weights in safetensors, training state beside them.

Each checkpoint is a directory ``checkpoints/step-<N>/`` written under a temporary name and
renamed when complete. Small pointer files (``last.json``, ``best.json``), replaced
atomically, name the current ones. A process killed at any moment leaves the previous
pointer and its complete directory in place.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from maskkit.errors import ConfigError, DamagedFileError
from maskkit.rundir import DIRECTORY_MODE, FILE_MODE, atomic_write_text

STATE_FILE = "state.pt"
#: A checkpoint directory found damaged on resume is renamed ``damaged-step-<N>``: kept for a
#: look, never pointed at, reused or removed.
DAMAGED_PREFIX = "damaged-"
#: What reading a truncated or overwritten file raises: safetensors' header errors, and
#: torch.load's (OSError, EOFError, RuntimeError from the zip reader, UnpicklingError).
_READ_ERRORS = (SafetensorError, OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError)


@dataclass
class Checkpoint:
    """A loaded checkpoint: module weights by name, and the training state."""

    path: Path
    weights: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]

    def load_into(self, modules: dict[str, nn.Module]) -> None:
        for name, module in modules.items():
            if name in self.weights:
                module.load_state_dict(self.weights[name])


def _fsync_directory(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def save_checkpoint(
    directory: Path,
    step: int,
    modules: dict[str, nn.Module],
    state: dict[str, Any],
    pointers: tuple[str, ...] = ("last",),
) -> Path:
    """Write ``modules`` (safetensors, one file each) and ``state`` (torch.save) as ``step-<step>``,
    then point each of ``pointers`` (``"last"``, ``"best"``) at it. Old unpointed ones are removed."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:09d}"
    if final.is_dir():  # this step is already saved (e.g. "best" right after "last"): repoint only
        _write_pointers(directory, final, step, pointers)
        return final
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=".staging-"))
    try:
        for name, module in modules.items():
            tensors = {key: value.detach().contiguous().cpu() for key, value in module.state_dict().items()}
            save_file(tensors, staging / f"{name}.safetensors")
        buffer = io.BytesIO()
        torch.save(state, buffer)
        (staging / STATE_FILE).write_bytes(buffer.getvalue())
        for file in staging.iterdir():
            file.chmod(FILE_MODE)  # safetensors writes 0600, torch's bytes 0644: one mode for all
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
        staging.chmod(DIRECTORY_MODE)  # mkdtemp makes it 0700
        os.replace(staging, final)
        _fsync_directory(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _write_pointers(directory, final, step, pointers)
    return final


def _write_pointers(directory: Path, target: Path, step: int, pointers: tuple[str, ...]) -> None:
    for pointer in pointers:
        atomic_write_text(directory / f"{pointer}.json", json.dumps({"dir": target.name, "step": step}))
    _remove_unpointed(directory)


def _pointed(directory: Path) -> set[str]:
    names = set()
    for pointer in directory.glob("*.json"):
        try:
            names.add(json.loads(pointer.read_text())["dir"])
        except (json.JSONDecodeError, KeyError, OSError):
            continue
    return names


def _remove_unpointed(directory: Path) -> None:
    keep = _pointed(directory)
    for child in directory.iterdir():
        if child.is_dir() and child.name not in keep and not child.name.startswith(DAMAGED_PREFIX):
            shutil.rmtree(child, ignore_errors=True)


def checkpoint_path(directory: Path, pointer: str = "last") -> Path | None:
    """The directory ``pointer`` names, or None if there is none."""
    pointer_file = directory / f"{pointer}.json"
    if not pointer_file.is_file():
        return None
    try:
        name = json.loads(pointer_file.read_text())["dir"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise DamagedFileError(pointer_file, _problem(error), _fix(directory)) from None
    path = directory / name
    return path if path.is_dir() else None


def load_checkpoint(directory: Path, pointer: str = "last", map_location: str = "cpu") -> Checkpoint:
    """Load the checkpoint ``pointer`` names under ``directory``.

    Raises:
        ConfigError: there is no such checkpoint.
        DamagedFileError: one of its files does not read back (truncated, overwritten).
    """
    path = checkpoint_path(directory, pointer)
    if path is None:
        raise ConfigError(f"no '{pointer}' checkpoint under {directory}")
    return read_checkpoint(path, map_location)


def read_checkpoint(path: Path, map_location: str = "cpu") -> Checkpoint:
    """Load the checkpoint directory ``path``; :class:`DamagedFileError` names a file that does
    not read back, and what to do."""
    weights = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            weights[file.stem] = load_file(file, device=map_location)
        except _READ_ERRORS as error:
            raise DamagedFileError(file, _problem(error), _fix(path.parent)) from None
    state_file = path / STATE_FILE
    state: dict[str, Any] = {}
    if state_file.exists():
        try:
            state = torch.load(state_file, map_location=map_location, weights_only=False)
        except _READ_ERRORS as error:
            raise DamagedFileError(state_file, _problem(error), _fix(path.parent)) from None
    return Checkpoint(path=path, weights=weights, state=state)


def load_newest_intact(
    directory: Path, map_location: str = "cpu", set_aside: bool = True
) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint under ``directory`` that reads back whole: what ``--resume`` continues.

    Tries every ``step-<N>`` directory (each is complete: written under a temporary name and
    renamed), newest first; ``last`` names the newest unless a file of it was damaged since. With
    ``set_aside`` (the process that writes the run dir), each damaged one newer than the one
    loaded is renamed ``damaged-step-<N>``, so that no pointer and no later save at the same
    step reuses it, and ``last`` is pointed at the one loaded.

    Returns:
        The checkpoint (None when there is none at all), and one warning line per damaged one.

    Raises:
        DamagedFileError: every checkpoint is damaged (nothing is renamed then).
    """
    candidates = sorted(directory.glob("step-*"), key=lambda path: path.name, reverse=True)
    damaged: list[tuple[Path, DamagedFileError]] = []
    for path in candidates:
        if not path.is_dir():
            continue
        try:
            checkpoint = read_checkpoint(path, map_location)
        except DamagedFileError as error:
            damaged.append((path, error))
            continue
        break
    else:
        if damaged:
            path, error = damaged[0]
            raise DamagedFileError(
                error.path,
                error.problem,
                "no intact checkpoint is left to resume from: restore the file from a copy, or start "
                "the run again in a new --run-dir",
            ) from None
        return None, []
    warnings = []
    for path, error in damaged:
        kept = path.with_name(DAMAGED_PREFIX + path.name)
        if set_aside:
            os.replace(path, kept)
        warnings.append(
            f"checkpoint {path.name} is damaged ({Path(error.path).name}: {error.problem}); resuming from "
            f"{checkpoint.path.name}, the newest intact one"
            + (f" (the damaged one is kept as {kept})" if set_aside else "")
        )
    if damaged and set_aside:
        step = int(checkpoint.path.name.removeprefix("step-"))
        _write_pointers(directory, checkpoint.path, step, ("last",))
    return checkpoint, warnings


def _problem(error: BaseException) -> str:
    """``"SafetensorError: header too small"``: an exception's type and first line."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    printable = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in lines[0])  # garbage bytes
    return f"{type(error).__name__}: {printable}"


def _fix(directory: Path) -> str:
    """What to do about a damaged file under a run's ``checkpoints/`` folder ``directory``."""
    run_dir = directory.parent
    return (
        f"restore it from a copy, or train the run again (an unfinished run continues from its newest "
        f"intact checkpoint: maskkit train --resume {run_dir})"
    )
