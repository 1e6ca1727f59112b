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
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from maskkit.errors import ConfigError
from maskkit.rundir import atomic_write_text

STATE_FILE = "state.pt"


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
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
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
        if child.is_dir() and child.name not in keep:
            shutil.rmtree(child, ignore_errors=True)


def checkpoint_path(directory: Path, pointer: str = "last") -> Path | None:
    """The directory ``pointer`` names, or None if there is none."""
    pointer_file = directory / f"{pointer}.json"
    if not pointer_file.is_file():
        return None
    try:
        name = json.loads(pointer_file.read_text())["dir"]
    except (json.JSONDecodeError, KeyError) as error:
        raise ConfigError(f"checkpoint pointer {pointer_file} is unreadable: {error}") from None
    path = directory / name
    return path if path.is_dir() else None


def load_checkpoint(directory: Path, pointer: str = "last", map_location: str = "cpu") -> Checkpoint:
    """Load the checkpoint ``pointer`` names under ``directory``."""
    path = checkpoint_path(directory, pointer)
    if path is None:
        raise ConfigError(f"no '{pointer}' checkpoint under {directory}")
    weights = {file.stem: load_file(file, device=map_location) for file in path.glob("*.safetensors")}
    state_file = path / STATE_FILE
    state = (
        torch.load(state_file, map_location=map_location, weights_only=False) if state_file.exists() else {}
    )
    return Checkpoint(path=path, weights=weights, state=state)
