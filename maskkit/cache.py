"""Compute-once tensor caches on disk, safe under concurrent builders and crashes.

Expensive per-dataset artefacts (per-patch prior maps, say) are built once and stored as a
safetensors file. Builders of the same cache serialise on a lock file, so the work is done once;
the file itself is written to a temporary name and renamed, so a reader never sees a partial
file, and a file left corrupt by an older crash is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from maskkit.rundir import FILE_MODE


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def load_if_valid(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors at ``path``, or None when the file is missing, truncated or corrupt."""
    if not path.is_file():
        return None
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError):
        return None  # truncated or corrupt: rebuild


def write_tensors_atomically(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save ``tensors`` (and string ``metadata``) to ``path`` (safetensors) through a temporary
    file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        tensors = {key: value.contiguous().cpu() for key, value in tensors.items()}
        save_file(tensors, temporary, metadata=metadata)
        os.chmod(temporary, FILE_MODE)  # mkstemp's 0600, as the rest of maskkit's files
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def cached_tensors(
    path: Path, build: Callable[[], dict[str, torch.Tensor]], metadata: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors stored at ``path``, building and storing them (with ``metadata``) first if needed.

    Concurrent callers (threads or processes) with the same ``path`` build once: the others wait
    on ``<path>.lock`` and then load what the first one wrote.
    """
    cached = load_if_valid(path)
    if cached is not None:
        return cached
    with _exclusive(path.with_name(path.name + ".lock")):
        cached = load_if_valid(path)  # built by another process while this one waited
        if cached is not None:
            return cached
        tensors = build()
        write_tensors_atomically(path, tensors, metadata)
        return tensors
