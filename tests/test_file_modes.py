"""Every file of a run has one permission mode, whichever tool wrote it (issue 22, part 9).

tempfile makes 0600 files and 0700 folders and safetensors writes 0600, while ``open()`` gives
0644 under the usual umask: a run dir used to mix both. maskkit now gives each file what
``open()`` would (:data:`maskkit.rundir.FILE_MODE`) and each folder what ``mkdir()`` would.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch

from maskkit.cache import write_tensors_atomically
from maskkit.checkpoint import save_checkpoint
from maskkit.rundir import DIRECTORY_MODE, FILE_MODE, atomic_write_bytes, atomic_write_text


def _modes(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): stat.S_IMODE(path.stat().st_mode) for path in root.rglob("*")}


def test_the_modes_are_what_open_and_mkdir_give_under_the_umask() -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    assert (0o666 & ~umask, 0o777 & ~umask) == (FILE_MODE, DIRECTORY_MODE)
    assert FILE_MODE & stat.S_IRUSR and not FILE_MODE & stat.S_IXUSR


def test_every_file_and_folder_maskkit_writes_has_the_same_mode(tmp_path: Path) -> None:
    reference = tmp_path / "reference.txt"
    reference.write_text("as open() writes it")
    atomic_write_text(tmp_path / "summary.json", "{}")
    atomic_write_bytes(tmp_path / "predictions_test.npz", b"\0")
    write_tensors_atomically(tmp_path / "cache" / "priors.safetensors", {"x": torch.zeros(2)})
    modules = {"mae": torch.nn.Linear(2, 2)}
    save_checkpoint(tmp_path / "checkpoints", 3, modules, {"step": 3}, ("last", "best"))
    modes = _modes(tmp_path)
    assert {"checkpoints/step-000000003/mae.safetensors", "checkpoints/last.json"} <= set(modes)
    files = {name: mode for name, mode in modes.items() if (tmp_path / name).is_file()}
    folders = {name: mode for name, mode in modes.items() if (tmp_path / name).is_dir()}
    assert set(files.values()) == {stat.S_IMODE(reference.stat().st_mode)} == {FILE_MODE}, files
    assert set(folders.values()) == {DIRECTORY_MODE}, folders
