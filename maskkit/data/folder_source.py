"""Image-folder datasets: ``train/<class>/*``, ``test/<class>/*`` and optional ``val/<class>/*``.

The layout may sit in a folder or inside a ``.zip`` file (read member by member, never extracted
to disk). A zip may also wrap the layout in one top-level folder (``cifar10/train/...``). Images
of any format PIL reads are converted to RGB.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from maskkit.errors import DataError

from .locations import DATA_DIR_ENV
from .preprocess import build_dataset, resize_square
from .types import ImageSplit, LabelledDataset

__all__ = ["IMAGE_EXTENSIONS", "load_image_folder"]

#: File name endings read as images (case-insensitive).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)

_SPLITS = ("train", "val", "test")
_LAYOUT = (
    "train/<class>/<image> and test/<class>/<image> (optionally val/<class>/<image>), e.g. train/cat/0001.jpg"
)
# Seed of the fixed order images are put in (see _fixed_order).
_ORDER_SEED = 0


@dataclass
class _Listing:
    """What a folder or zip holds: per split, the class folders and each class's image names."""

    files: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    class_dirs: dict[str, set[str]] = field(default_factory=dict)

    def add_dir(self, split: str, cls: str) -> None:
        self.class_dirs.setdefault(split, set()).add(cls)

    def add_file(self, split: str, cls: str, name: str) -> None:
        self.files.setdefault(split, {}).setdefault(cls, []).append(name)


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _layout_help(source: str) -> str:
    return (
        f"Expected {source} to hold {_LAYOUT}. Point --data-dir (or the {DATA_DIR_ENV} "
        "environment variable) at a folder or .zip file with that layout."
    )


def _list_folder(root: Path) -> _Listing:
    listing = _Listing()
    for split in _SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if class_dir.name.startswith("."):
                continue
            listing.add_dir(split, class_dir.name)
            for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for fname in filenames:
                    if not fname.startswith(".") and _is_image_name(fname):
                        listing.add_file(split, class_dir.name, os.path.join(dirpath, fname))
    return listing


def _zip_prefix(names: list[str]) -> str:
    """``""`` if the layout sits at the zip's root, ``"<top>/"`` if inside one top folder."""
    tops = {n.split("/", 1)[0] for n in names if n and not _hidden(tuple(n.split("/")[:1]))}
    if tops & set(_SPLITS) or len(tops) != 1:
        return ""
    return f"{tops.pop()}/"


def _list_zip(zf: zipfile.ZipFile) -> _Listing:
    listing = _Listing()
    names = [n.replace("\\", "/") for n in zf.namelist()]
    prefix = _zip_prefix(names)
    for original, name in zip(zf.namelist(), names, strict=True):
        if not name.startswith(prefix):
            continue
        parts = PurePosixPath(name[len(prefix) :]).parts
        if len(parts) < 2 or parts[0] not in _SPLITS or _hidden(parts):
            continue
        split, cls = parts[0], parts[1]
        if name.endswith("/"):  # an explicit directory entry
            listing.add_dir(split, cls)
        elif len(parts) >= 3 and _is_image_name(parts[-1]):
            listing.add_dir(split, cls)
            listing.add_file(split, cls, original)
    return listing


def _fixed_order(n: int) -> torch.Tensor:
    """A fixed pseudo-random order of ``n`` items.

    Folder listings are sorted by class; make_splits cuts the train split by position, so a
    class-sorted order would leave whole classes out of fine-tuning. Every prefix of this order
    mixes all classes, as CIFAR's own order does.
    """
    return torch.randperm(n, generator=torch.Generator().manual_seed(_ORDER_SEED))


def _decode(data: bytes, where: str, image_size: int) -> np.ndarray:
    """Decode one image file to ``[S, S, 3]`` uint8 RGB, resizing when its size differs."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            array = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as err:
        raise DataError(
            f"{where} cannot be read as an image ({type(err).__name__}: {err}). Replace or remove the file."
        ) from None
    if array.shape[:2] != (image_size, image_size):
        chw = torch.from_numpy(array.copy()).permute(2, 0, 1)[None]
        array = resize_square(chw, image_size)[0].permute(1, 2, 0).numpy()
    return array


def _read_split(
    entries: list[tuple[str, int]],
    read: Callable[[str], bytes],
    describe: Callable[[str], str],
    image_size: int,
) -> ImageSplit:
    """Decode ``entries`` (name, label) in the fixed order into ``[N, 3, S, S]`` uint8."""
    order = _fixed_order(len(entries)).tolist()
    pixels = np.empty((len(entries), image_size, image_size, 3), dtype=np.uint8)
    labels = np.empty(len(entries), dtype=np.int64)
    for out_index, entry_index in enumerate(order):
        name, label = entries[entry_index]
        try:
            data = read(name)
        except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as err:
            raise DataError(
                f"{describe(name)} cannot be read ({type(err).__name__}: {err}). "
                "Replace the damaged file or archive."
            ) from None
        pixels[out_index] = _decode(data, describe(name), image_size)
        labels[out_index] = label
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    return ImageSplit(images=images, labels=torch.from_numpy(labels))


def _check_listing(listing: _Listing, source: str) -> list[str]:
    """Validate the layout; returns the sorted class names of the train split."""
    train = listing.files.get("train", {})
    if not train:
        if not listing.class_dirs.get("train"):
            raise DataError(f"{source} has no train/<class>/ folders. " + _layout_help(source))
        raise DataError(f"{source} holds no images under train/. " + _layout_help(source))
    for split in _SPLITS:
        empty = sorted(listing.class_dirs.get(split, set()) - set(listing.files.get(split, {})))
        if empty:
            shown = ", ".join(f"{split}/{c}/" for c in empty[:5]) + (", ..." if len(empty) > 5 else "")
            raise DataError(
                f"{source}: the class folder(s) {shown} hold no images. Remove them or add "
                f"images (one of {', '.join(sorted(IMAGE_EXTENSIONS))})."
            )
    if not listing.files.get("test"):
        raise DataError(f"{source} holds no images under test/. " + _layout_help(source))
    class_names = sorted(train)
    for split in ("val", "test"):
        extra = sorted(set(listing.files.get(split, {})) - set(class_names))
        if extra:
            raise DataError(
                f"{source}: {split}/ has class folder(s) that train/ lacks: {', '.join(extra)}. "
                f"Every {split} class must also be a train class; add them to train/ or remove "
                f"them from {split}/."
            )
    return class_names


def _entries(files: dict[str, list[str]], class_names: list[str]) -> list[tuple[str, int]]:
    index = {c: i for i, c in enumerate(class_names)}
    return [(n, index[c]) for c in sorted(files) for n in sorted(files[c])]


def load_image_folder(data_dir: Path, *, image_size: int, download: bool = False) -> LabelledDataset:
    """Load an image-folder dataset from a folder or a ``.zip`` file.

    Args:
        data_dir: a folder, or a ``.zip`` file, holding ``train/<class>/*`` and
            ``test/<class>/*`` (optionally ``val/<class>/*``).
        image_size: the square side length ``S``; images of another size are resized.
        download: ignored except in the error message: there is nothing to download.

    Returns:
        The dataset with ``[N, 3, S, S]`` uint8 splits; ``val`` only if ``val/`` holds images.
        Class names are the sorted class folder names of ``train/``. Within a split, images
        come in a fixed pseudo-random order (seed 0), not grouped by class.
    """
    source = str(data_dir)
    if not data_dir.exists():
        note = " (--download cannot fetch an image folder.)" if download else ""
        raise DataError(f"{source} does not exist.{note} " + _layout_help(source))

    if data_dir.is_dir():
        listing = _list_folder(data_dir)
        class_names = _check_listing(listing, source)

        def read(name: str) -> bytes:
            return Path(name).read_bytes()

        def describe(name: str) -> str:
            return name

        splits = {
            split: _read_split(_entries(listing.files[split], class_names), read, describe, image_size)
            for split in _SPLITS
            if split in listing.files
        }
    else:
        try:
            zf = zipfile.ZipFile(data_dir)
        except (zipfile.BadZipFile, OSError) as err:
            raise DataError(
                f"{source} is not a folder or a readable .zip file ({type(err).__name__}: {err}). "
                + _layout_help(source)
            ) from None
        with zf:
            listing = _list_zip(zf)
            class_names = _check_listing(listing, source)

            def describe_member(name: str) -> str:
                return f"{source}:{name}"

            splits = {
                split: _read_split(
                    _entries(listing.files[split], class_names), zf.read, describe_member, image_size
                )
                for split in _SPLITS
                if split in listing.files
            }

    return build_dataset(
        "imagefolder",
        train=splits["train"],
        val=splits.get("val"),
        test=splits["test"],
        class_names=class_names,
        image_size=image_size,
        source=source,
    )
