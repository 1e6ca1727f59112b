"""The MLO-MAE splits, and the ImageSplit / LabelledDataset containers."""

from __future__ import annotations

import pytest
import torch

from maskkit.data import ImageSplit, LabelledDataset, make_splits
from maskkit.errors import DataError


def _split(n: int, offset: int = 0) -> ImageSplit:
    """``n`` 4x4 images whose pixels and labels both encode their index (+ offset)."""
    ids = torch.arange(offset, offset + n)
    images = (ids % 256).to(torch.uint8).reshape(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    return ImageSplit(images=images, labels=ids.to(torch.int64))


def _dataset(n_train: int, n_val: int | None, n_test: int = 5) -> LabelledDataset:
    return LabelledDataset(
        name="toy",
        train=_split(n_train),
        val=_split(n_val, 1000) if n_val is not None else None,
        test=_split(n_test, 2000),
        class_names=[f"c{i}" for i in range(3000)],
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )


def test_image_split_basics() -> None:
    split = _split(10)
    assert len(split) == 10
    sub = split.subset(torch.tensor([7, 2, 2]))
    assert sub.labels.tolist() == [7, 2, 2]
    assert sub.images[:, 0, 0, 0].tolist() == [7, 2, 2]
    mask = split.subset(split.labels % 2 == 0)
    assert mask.labels.tolist() == [0, 2, 4, 6, 8]


@pytest.mark.parametrize(
    ("images", "labels"),
    [
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)),
        (torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64)),
        (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64)),
        (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32)),
    ],
)
def test_image_split_validates(images: torch.Tensor, labels: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        ImageSplit(images=images, labels=labels)


def test_dataset_properties() -> None:
    ds = _dataset(10, 3)
    assert ds.num_classes == 3000 and ds.image_size == 4


def test_train_tail_is_the_paper_split() -> None:
    ds = _dataset(10, 4)
    s = make_splits(ds, train_portion=0.8)
    assert s.pretrain.labels.tolist() == list(range(10))
    assert s.finetune.labels.tolist() == list(range(8))
    assert s.mask_val.labels.tolist() == [8, 9]
    assert s.mask_val.images[:, 0, 0, 0].tolist() == [8, 9]
    # Selection uses the dataset's own val split, which no level trains on.
    assert s.eval is ds.val and s.test is ds.test


def test_without_a_val_split_selection_uses_held_out_train_images_never_test() -> None:
    ds = _dataset(100, None)
    s = make_splits(ds, train_portion=0.8, val_portion=0.1)
    assert s.eval.labels.tolist() == list(range(90, 100))
    assert s.pretrain.labels.tolist() == list(range(90))
    assert s.finetune.labels.tolist() == list(range(72))
    assert s.mask_val.labels.tolist() == list(range(72, 90))
    assert s.eval is not ds.test and "held out" in s.eval_source
    used = set(s.pretrain.labels.tolist()) | set(s.finetune.labels.tolist()) | set(s.mask_val.labels.tolist())
    assert used.isdisjoint(s.eval.labels.tolist())


def test_train_tail_rounding() -> None:
    s = make_splits(_dataset(100, 5), train_portion=0.29)
    assert (len(s.finetune), len(s.mask_val)) == (29, 71)
    s = make_splits(_dataset(7007, 5), train_portion=0.8)
    assert (len(s.finetune), len(s.mask_val)) == (5605, 1402)


def test_val_mask_source_uses_the_val_split_for_the_mask_level() -> None:
    ds = _dataset(10, 4)
    s = make_splits(ds, mask_source="val")
    assert s.finetune.labels.tolist() == list(range(10))
    assert s.mask_val is ds.val and s.eval is ds.val


def test_val_source_without_val_split() -> None:
    with pytest.raises(DataError, match="train_tail"):
        make_splits(_dataset(10, None), mask_source="val")


@pytest.mark.parametrize("portion", [0.0, 1.0, -0.5, 1.5, float("nan")])
@pytest.mark.parametrize("name", ["train_portion", "val_portion"])
def test_bad_portion(portion: float, name: str) -> None:
    with pytest.raises(DataError, match=name):
        make_splits(_dataset(10, None), **{name: portion})


def test_bad_mask_source() -> None:
    with pytest.raises(DataError, match="mask_source"):
        make_splits(_dataset(10, None), mask_source="elsewhere")  # type: ignore[arg-type]


@pytest.mark.parametrize(("n_train", "portion"), [(1, 0.8), (3, 0.1), (2, 0.4)])
def test_empty_finetune_raises(n_train: int, portion: float) -> None:
    with pytest.raises(DataError, match="finetune split of dataset 'toy' is empty"):
        make_splits(_dataset(n_train, 2), train_portion=portion)


def test_empty_test_raises() -> None:
    with pytest.raises(DataError, match="test split of dataset 'toy' is empty"):
        make_splits(_dataset(10, None, n_test=0))
