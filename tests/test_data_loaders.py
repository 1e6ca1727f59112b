"""Dataset loaders: MedMNIST npz, CIFAR pickles, image folders and zips, and their errors.

Every test writes its own small files in the real on-disk formats; nothing is downloaded.
"""

from __future__ import annotations

import pickle
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from maskkit.data import (
    DATA_DIR_ENV,
    LabelledDataset,
    dataset_names,
    default_data_dir,
    load_dataset,
)
from maskkit.errors import DataError, UnknownNameError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# --------------------------------------------------------------------------- MedMNIST npz


def _medmnist_arrays(
    n: dict[str, int], num_classes: int, channels: int, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in n.items():
        shape = (count, 28, 28, 3) if channels == 3 else (count, 28, 28)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        labels = np.arange(count) % num_classes
        arrays[f"{split}_labels"] = labels.astype(np.uint8).reshape(count, 1)
    return arrays


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture
def derma_dir(tmp_path: Path) -> Path:
    arrays = _medmnist_arrays({"train": 21, "val": 7, "test": 14}, num_classes=7, channels=3)
    _write_npz(tmp_path / "dermamnist.npz", arrays)
    return tmp_path


def test_medmnist_colour_npz_loads_and_resizes(derma_dir: Path) -> None:
    arrays = dict(np.load(derma_dir / "dermamnist.npz"))
    ds = load_dataset("dermamnist", derma_dir, image_size=32)
    assert isinstance(ds, LabelledDataset)
    assert ds.name == "dermamnist"
    assert ds.num_classes == 7 and ds.class_names[0].startswith("actinic keratoses")
    assert ds.val is not None
    for split, n in (("train", 21), ("val", 7), ("test", 14)):
        part = getattr(ds, split)
        assert part.images.shape == (n, 3, 32, 32) and part.images.dtype == torch.uint8
        assert part.labels.dtype == torch.int64
        assert part.labels.tolist() == arrays[f"{split}_labels"][:, 0].tolist()
    # Bicubic antialiased resize on float, rounded and clamped back to uint8.
    src = torch.from_numpy(arrays["train_images"]).permute(0, 3, 1, 2).float()
    want = F.interpolate(src, size=(32, 32), mode="bicubic", antialias=True)
    want = want.round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(ds.train.images, want)
    # mean/std from the resized train images in [0, 1].
    x = ds.train.images.double() / 255
    assert np.allclose(ds.mean, x.mean(dim=(0, 2, 3)).tolist(), atol=1e-9)
    assert np.allclose(ds.std, x.std(dim=(0, 2, 3), correction=0).tolist(), atol=1e-9)


def test_medmnist_grayscale_npz_repeats_channels(tmp_path: Path) -> None:
    arrays = _medmnist_arrays({"train": 6, "val": 2, "test": 4}, num_classes=2, channels=1)
    _write_npz(tmp_path / "pneumoniamnist.npz", arrays)
    ds = load_dataset("PneumoniaMNIST", tmp_path, image_size=28)
    assert ds.class_names == ["normal", "pneumonia"]
    assert ds.train.images.shape == (6, 3, 28, 28)
    want = torch.from_numpy(arrays["train_images"])
    for c in range(3):
        assert torch.equal(ds.train.images[:, c], want)


def test_medmnist_missing_file_names_path_and_options(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("dermamnist", tmp_path, image_size=32)
    msg = str(info.value)
    assert str(tmp_path / "dermamnist.npz") in msg
    assert "--data-dir" in msg and DATA_DIR_ENV in msg and "--download" in msg


def test_medmnist_truncated_npz(derma_dir: Path) -> None:
    path = derma_dir / "dermamnist.npz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupt") as info:
        load_dataset("dermamnist", derma_dir, image_size=32)
    assert str(path) in str(info.value)


def test_medmnist_missing_array(tmp_path: Path) -> None:
    arrays = _medmnist_arrays({"train": 4, "val": 2, "test": 2}, num_classes=7, channels=3)
    del arrays["val_labels"]
    _write_npz(tmp_path / "dermamnist.npz", arrays)
    with pytest.raises(DataError, match=r"dermamnist\.npz"):
        load_dataset("dermamnist", tmp_path, image_size=28)


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("train_images", np.zeros((4, 28), dtype=np.uint8)),
        ("train_images", np.zeros((4, 28, 28, 3), dtype=np.float32)),
        ("train_images", np.zeros((4, 28, 28, 2), dtype=np.uint8)),
        ("train_labels", np.zeros((4, 2), dtype=np.uint8)),
        ("train_labels", np.zeros((3, 1), dtype=np.uint8)),
        ("train_labels", np.full((4, 1), 9, dtype=np.uint8)),
    ],
)
def test_medmnist_wrong_shape_or_dtype(tmp_path: Path, key: str, bad: np.ndarray) -> None:
    arrays = _medmnist_arrays({"train": 4, "val": 2, "test": 2}, num_classes=7, channels=3)
    arrays[key] = bad
    path = _write_npz(tmp_path / "dermamnist.npz", arrays)
    with pytest.raises(DataError) as info:
        load_dataset("dermamnist", tmp_path, image_size=28)
    assert str(path) in str(info.value) and "replace" in str(info.value)


def test_medmnist_multilabel_flag_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="multi-label"):
        load_dataset("chestmnist", tmp_path, image_size=28)


@pytest.mark.skipif(not (SHARED_DATA / "dermamnist.npz").is_file(), reason="shared DermaMNIST copy absent")
def test_real_dermamnist() -> None:
    ds = load_dataset("dermamnist", SHARED_DATA, image_size=32)
    assert (len(ds.train), len(ds.val or []), len(ds.test)) == (7007, 1003, 2005)
    assert torch.bincount(ds.train.labels).tolist() == [228, 359, 769, 80, 779, 4693, 99]
    assert ds.train.images.shape[1:] == (3, 32, 32)
    assert np.allclose(ds.mean, (0.763, 0.546, 0.571), atol=2e-3)


# --------------------------------------------------------------------------- names, folders


def test_unknown_name_lists_available() -> None:
    with pytest.raises(UnknownNameError) as info:
        load_dataset("nosuchset", Path("."), image_size=32)
    msg = str(info.value)
    for name in ("cifar10", "cifar100", "dermamnist", "imagefolder", "pathmnist"):
        assert name in msg


def test_dataset_names() -> None:
    names = dataset_names()
    assert names == sorted(names)
    assert {"cifar10", "cifar100", "imagefolder", "dermamnist", "pneumoniamnist"} <= set(names)
    assert not any(n.endswith("3d") for n in names)
    assert "chestmnist" not in names


def test_bad_image_size(derma_dir: Path) -> None:
    with pytest.raises(DataError, match="image_size"):
        load_dataset("dermamnist", derma_dir, image_size=0)


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "d"))
    assert default_data_dir() == tmp_path / "d"
    monkeypatch.delenv(DATA_DIR_ENV)
    assert default_data_dir().parts[-2:] == ("maskkit", "data")


# --------------------------------------------------------------------------- CIFAR pickles


def _cifar_batch(rng: np.random.Generator, n: int, num_classes: int, label_key: str) -> dict:
    batch = {
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: [int(x) for x in rng.integers(0, num_classes, n)],
    }
    if label_key == "fine_labels":
        batch["coarse_labels"] = [x // 5 for x in batch[label_key]]
    return batch


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _write_cifar10(root: Path) -> dict[str, list[dict]]:
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train = [_cifar_batch(rng, 3, 10, "labels") for _ in range(5)]
    for i, batch in enumerate(train, start=1):
        _pickle(folder / f"data_batch_{i}", batch)
    test = [_cifar_batch(rng, 4, 10, "labels")]
    _pickle(folder / "test_batch", test[0])
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {"label_names": names})
    return {"train": train, "test": test}


def _write_cifar100(root: Path) -> dict[str, list[dict]]:
    rng = np.random.default_rng(2)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train, test = _cifar_batch(rng, 12, 100, "fine_labels"), _cifar_batch(rng, 5, 100, "fine_labels")
    _pickle(folder / "train", train)
    _pickle(folder / "test", test)
    _pickle(folder / "meta", {"fine_label_names": [f"c{i:03d}" for i in range(100)]})
    return {"train": [train], "test": [test]}


@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bypass torchvision's md5 check (the test files are not the official ones)."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)


def _expected_cifar(batches: list[dict], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
    labels = [x for b in batches for x in b[key]]
    return torch.from_numpy(data), torch.tensor(labels, dtype=torch.int64)


@pytest.mark.usefixtures("no_md5")
def test_cifar10_pickles(tmp_path: Path) -> None:
    written = _write_cifar10(tmp_path)
    ds = load_dataset("cifar10", tmp_path, image_size=32)
    assert ds.val is None and ds.num_classes == 10 and ds.class_names[-1] == "truck"
    for split in ("train", "test"):
        images, labels = _expected_cifar(written[split], "labels")
        assert torch.equal(getattr(ds, split).images, images)
        assert torch.equal(getattr(ds, split).labels, labels)


@pytest.mark.usefixtures("no_md5")
def test_cifar100_pickles_resized(tmp_path: Path) -> None:
    written = _write_cifar100(tmp_path)
    ds = load_dataset("cifar100", tmp_path, image_size=16)
    assert ds.val is None and ds.num_classes == 100 and ds.class_names[7] == "c007"
    images, labels = _expected_cifar(written["train"], "fine_labels")
    assert ds.train.images.shape == (12, 3, 16, 16)
    assert torch.equal(ds.train.labels, labels)
    want = F.interpolate(images.float(), size=(16, 16), mode="bicubic", antialias=True)
    assert torch.equal(ds.train.images, want.round().clamp(0, 255).to(torch.uint8))


@pytest.mark.parametrize(
    ("name", "folder"), [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_cifar_missing_folder(tmp_path: Path, name: str, folder: str) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(name, tmp_path, image_size=32)
    msg = str(info.value)
    assert str(tmp_path / folder) in msg and "--data-dir" in msg and "--download" in msg


def test_cifar_md5_mismatch_is_corrupt(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)  # not the official bytes, so torchvision's md5 check fails
    with pytest.raises(DataError, match="corrupt") as info:
        load_dataset("cifar10", tmp_path, image_size=32)
    assert "cifar-10-batches-py" in str(info.value)


@pytest.mark.usefixtures("no_md5")
def test_cifar_incomplete_folder(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path, image_size=32)


@pytest.mark.usefixtures("no_md5")
def test_cifar_unpicklable_file(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="corrupt"):
        load_dataset("cifar10", tmp_path, image_size=32)


# --------------------------------------------------------------------------- image folders

CLASSES = ["cat", "dog", "eel"]


def _colour(split: str, cls: int, k: int) -> tuple[int, int, int]:
    """A colour that identifies one image: (split, class, index)."""
    return (100 + ("train", "val", "test").index(split) * 50, 20 + cls * 60, 10 + k * 10)


def _write_folder(root: Path, counts: dict[str, dict[str, int]]) -> None:
    for split, per_class in counts.items():
        for cls, n in per_class.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                colour = _colour(split, CLASSES.index(cls), k)
                if k % 3 == 1:  # grayscale PNG: stored as one channel
                    Image.new("L", (8, 8), colour[2]).save(folder / f"{k:04d}.png")
                else:
                    Image.new("RGB", (8, 8), colour).save(folder / f"{k:04d}.png")


COUNTS = {
    "train": {"cat": 5, "dog": 4, "eel": 3},
    "val": {"dog": 2},
    "test": {"cat": 2, "eel": 3},
}


def _check_folder_dataset(ds: LabelledDataset) -> None:
    assert ds.name == "imagefolder" and ds.class_names == CLASSES
    assert ds.val is not None
    for split in ("train", "val", "test"):
        part = getattr(ds, split)
        assert part.images.shape == (sum(COUNTS[split].values()), 3, 8, 8)
        want = sorted((CLASSES.index(c), k) for c, n in COUNTS[split].items() for k in range(n))
        seen = []
        for image, label in zip(part.images, part.labels.tolist(), strict=True):
            # Recover (class, k) from the pixel colour and check it against the label.
            r, g, b = image[:, 0, 0].tolist()
            k = (b - 10) // 10
            if r == g == b:  # a grayscale one: only the index is in the pixels
                assert k % 3 == 1
            else:
                assert (r - 100) // 50 == ("train", "val", "test").index(split)
                assert (g - 20) // 60 == label
            seen.append((label, k))
            assert (image == image[:, :1, :1]).all()
        assert sorted(seen) == want
    # Not sorted by class: a prefix of train mixes classes (make_splits cuts by position).
    assert ds.train.labels.tolist() != sorted(ds.train.labels.tolist())


def test_image_folder(tmp_path: Path) -> None:
    _write_folder(tmp_path / "set", COUNTS)
    (tmp_path / "set" / "train" / "cat" / "notes.txt").write_text("not an image")
    ds = load_dataset("imagefolder", tmp_path / "set", image_size=8)
    _check_folder_dataset(ds)


@pytest.mark.parametrize("prefix", ["", "wrapped/"])
def test_image_folder_zip_matches_folder(tmp_path: Path, prefix: str) -> None:
    _write_folder(tmp_path / "set", COUNTS)
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((tmp_path / "set").rglob("*")):
            zf.write(path, prefix + path.relative_to(tmp_path / "set").as_posix())
    from_zip = load_dataset("imagefolder", archive, image_size=8)
    _check_folder_dataset(from_zip)
    from_folder = load_dataset("imagefolder", tmp_path / "set", image_size=8)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(from_zip, split).images, getattr(from_folder, split).images)
        assert torch.equal(getattr(from_zip, split).labels, getattr(from_folder, split).labels)


def test_image_folder_resizes_mixed_sizes(tmp_path: Path) -> None:
    root = tmp_path / "set"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        Image.new("RGB", (12, 10), (200, 100, 50)).save(root / split / "a" / "x.jpg")
        Image.new("RGB", (6, 6), (10, 20, 30)).save(root / split / "a" / "y.png")
    ds = load_dataset("imagefolder", root, image_size=6)
    assert ds.val is None and ds.train.images.shape == (2, 3, 6, 6)
    centres = sorted(tuple(img[:, 3, 3].tolist()) for img in ds.train.images)
    assert centres[0] == (10, 20, 30)  # the 6x6 PNG, untouched
    assert np.allclose(centres[1], (200, 100, 50), atol=4)  # the 12x10 JPEG, resized


def test_image_folder_empty(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as info:
        load_dataset("imagefolder", tmp_path / "empty", image_size=8)
    msg = str(info.value)
    assert str(tmp_path / "empty") in msg and "train/<class>/" in msg and "--data-dir" in msg


def test_image_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "set" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "set" / "train" / "cat" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        load_dataset("imagefolder", tmp_path / "set", image_size=8)


def test_image_folder_without_test(tmp_path: Path) -> None:
    _write_folder(tmp_path / "set", {"train": {"cat": 2}})
    with pytest.raises(DataError, match="test/"):
        load_dataset("imagefolder", tmp_path / "set", image_size=8)


def test_image_folder_test_class_not_in_train(tmp_path: Path) -> None:
    _write_folder(tmp_path / "set", {"train": {"cat": 2}, "test": {"cat": 1, "dog": 1}})
    with pytest.raises(DataError, match="dog"):
        load_dataset("imagefolder", tmp_path / "set", image_size=8)


def test_image_folder_empty_class_folder(tmp_path: Path) -> None:
    _write_folder(tmp_path / "set", {"train": {"cat": 2}, "test": {"cat": 1}})
    (tmp_path / "set" / "train" / "dog").mkdir()
    with pytest.raises(DataError, match="train/dog/"):
        load_dataset("imagefolder", tmp_path / "set", image_size=8)


def test_image_folder_corrupt_image(tmp_path: Path) -> None:
    _write_folder(tmp_path / "set", {"train": {"cat": 2}, "test": {"cat": 1}})
    bad = tmp_path / "set" / "train" / "cat" / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(DataError, match=r"bad\.jpg"):
        load_dataset("imagefolder", tmp_path / "set", image_size=8)


def test_image_folder_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("imagefolder", tmp_path / "nope.zip", image_size=8)
    assert "nope.zip" in str(info.value) and "does not exist" in str(info.value)


def test_image_folder_not_a_zip(tmp_path: Path) -> None:
    (tmp_path / "x.zip").write_bytes(b"garbage")
    with pytest.raises(DataError, match="zip"):
        load_dataset("imagefolder", tmp_path / "x.zip", image_size=8)


@pytest.mark.skipif(not (SHARED_DATA / "cifar10-jpg.zip").is_file(), reason="shared CIFAR-10 zip absent")
def test_real_cifar10_zip_layout() -> None:
    """Only list the real zip (decoding its 60000 JPEGs takes ~15 s: not in the test suite)."""
    from maskkit.data.folder_source import _check_listing, _list_zip

    start = time.perf_counter()
    with zipfile.ZipFile(SHARED_DATA / "cifar10-jpg.zip") as zf:
        listing = _list_zip(zf)
    classes = _check_listing(listing, "cifar10-jpg.zip")
    assert classes[:3] == ["airplane", "automobile", "bird"] and len(classes) == 10
    assert sum(len(v) for v in listing.files["train"].values()) == 50000
    assert sum(len(v) for v in listing.files["test"].values()) == 10000
    assert time.perf_counter() - start < 10
