"""Device-resident batches: order, wrapping, augmentation, normalisation and exact resume."""

from __future__ import annotations

import io

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from maskkit.data import DeviceBatches, ImageSplit, crop_flip, cutout, iterate_eval, normalize
from maskkit.errors import DataError

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)
CPU = torch.device("cpu")


def _split(n: int, size: int = 8, seed: int = 0) -> ImageSplit:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return ImageSplit(images=images, labels=torch.arange(n, dtype=torch.int64))


def _denormalize(x: torch.Tensor) -> torch.Tensor:
    """Invert :func:`normalize` back to uint8 (exact up to float rounding)."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x.cpu() * std + mean) * 255).round().to(torch.uint8)


def test_normalize_matches_torchvision() -> None:
    images = _split(4).images
    want = TF.normalize(TF.to_dtype(images, torch.float32, scale=True), list(MEAN), list(STD))
    assert torch.allclose(normalize(images, MEAN, STD), want, atol=1e-6)
    assert normalize(images, torch.tensor(MEAN), torch.tensor(STD)).dtype == torch.float32


def test_batches_cover_each_epoch_once_and_wrap() -> None:
    n, bs = 10, 4
    batches = DeviceBatches(_split(n), bs, CPU, MEAN, STD, augment="none", seed=3)
    assert batches.steps_per_epoch == 3
    ids = []
    for _ in range(10):  # 40 items = 4 full epochs
        images, labels, _ = batches.next()
        assert images.shape == (bs, 3, 8, 8) and images.dtype == torch.float32
        assert labels.shape == (bs,) and labels.dtype == torch.int64
        ids += labels.tolist()
    for epoch in range(4):
        assert sorted(ids[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert ids[:n] != ids[n : 2 * n]  # a fresh permutation each epoch
    assert (batches.epoch, batches.position) == (4, 0)


def test_no_augment_returns_the_images() -> None:
    split = _split(6)
    batches = DeviceBatches(split, 6, CPU, MEAN, STD, augment="none")
    images, labels, _ = batches.next()
    assert torch.equal(_denormalize(images), split.images[labels])


def test_batch_larger_than_split_cycles() -> None:
    batches = DeviceBatches(_split(3), 8, CPU, MEAN, STD, augment="none")
    assert batches.steps_per_epoch == 1
    _, labels, _ = batches.next()
    assert labels.shape == (8,)
    assert sorted(labels[:3].tolist()) == sorted(labels[3:6].tolist()) == [0, 1, 2]
    assert (batches.epoch, batches.position) == (2, 2)


def test_same_seed_same_stream_other_seed_differs() -> None:
    split = _split(20)
    a = DeviceBatches(split, 7, CPU, MEAN, STD, seed=5)
    b = DeviceBatches(split, 7, CPU, MEAN, STD, seed=5)
    c = DeviceBatches(split, 7, CPU, MEAN, STD, seed=6)
    xa, ya, _ = a.next()
    xb, yb, _ = b.next()
    _, yc, _ = c.next()
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(ya, yc)


def _reference_crop_flip(images, top, left, flip, padding=4):
    """``RandomCrop(padding)`` then ``RandomHorizontalFlip`` with given draws, one by one."""
    h, w = images.shape[-2:]
    out = []
    for img, t, lt, f in zip(images, top.tolist(), left.tolist(), flip.tolist(), strict=True):
        padded = TF.pad(img, [padding], fill=0)
        crop = TF.crop(padded, t, lt, h, w)
        out.append(TF.horizontal_flip(crop) if f else crop)
    return torch.stack(out)


def test_crop_flip_matches_torchvision() -> None:
    images = _split(16, size=6).images
    g = torch.Generator().manual_seed(0)
    top = torch.randint(0, 9, (16,), generator=g)
    left = torch.randint(0, 9, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    got = crop_flip(images, top, left, flip)
    assert torch.equal(got, _reference_crop_flip(images, top, left, flip))
    centre = torch.full((16,), 4)
    assert torch.equal(crop_flip(images, centre, centre, torch.zeros(16, dtype=torch.bool)), images)


def test_crop_flip_augmentation_is_a_shifted_flipped_copy() -> None:
    split = _split(32)
    batches = DeviceBatches(split, 32, CPU, MEAN, STD, augment="crop_flip", seed=1)
    images, labels, _ = batches.next()
    got = _denormalize(images)
    padded = [TF.pad(img, [4], fill=0) for img in split.images[labels]]
    n_flipped = 0
    for out, pad in zip(got, padded, strict=True):
        candidates = [
            (flip, t, lt)
            for t in range(9)
            for lt in range(9)
            for flip in (False, True)
            if torch.equal(
                out,
                TF.horizontal_flip(TF.crop(pad, t, lt, 8, 8)) if flip else TF.crop(pad, t, lt, 8, 8),
            )
        ]
        assert candidates, "every augmented image is a crop (maybe flipped) of its source"
        n_flipped += all(c[0] for c in candidates)
    assert 0 < n_flipped < 32


@pytest.mark.parametrize("augment", ["none", "crop_flip", "randaugment"])
def test_resume_reproduces_future_batches(augment: str) -> None:
    split = _split(10)
    first = DeviceBatches(split, 4, CPU, MEAN, STD, augment=augment, seed=11)
    for _ in range(4):  # k batches, crossing an epoch boundary
        first.next()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    expected = [first.next() for _ in range(5)]  # m more

    resumed = DeviceBatches(split, 4, CPU, MEAN, STD, augment=augment, seed=999)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert (resumed.epoch, resumed.position) == (1, 6)
    for (xe, ye, _), (xr, yr, _) in zip(expected, (resumed.next() for _ in range(5)), strict=True):
        assert torch.equal(xe, xr) and torch.equal(ye, yr)


def test_randaugment_is_seeded_and_leaves_global_rng_alone() -> None:
    split = _split(8)
    state = torch.get_rng_state()
    a = DeviceBatches(split, 8, CPU, MEAN, STD, augment="randaugment", seed=2).next().images
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(12345)  # the global RNG must not matter
    b = DeviceBatches(split, 8, CPU, MEAN, STD, augment="randaugment", seed=2).next().images
    c = DeviceBatches(split, 8, CPU, MEAN, STD, augment="crop_flip", seed=2).next().images
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # RandAugment changed something


def test_load_state_for_another_split_fails() -> None:
    state = DeviceBatches(_split(10), 4, CPU, MEAN, STD).state_dict()
    with pytest.raises(ValueError, match="10 images"):
        DeviceBatches(_split(11), 4, CPU, MEAN, STD).load_state_dict(state)


def test_bad_arguments() -> None:
    with pytest.raises(DataError):
        DeviceBatches(_split(0), 4, CPU, MEAN, STD)
    with pytest.raises(ValueError):
        DeviceBatches(_split(4), 0, CPU, MEAN, STD)
    with pytest.raises(ValueError):
        DeviceBatches(_split(4), 2, CPU, MEAN, STD, augment="mixup")  # type: ignore[arg-type]


def test_iterate_eval_fixed_order_with_partial_batch() -> None:
    split = _split(10)
    batches = list(iterate_eval(split, 4, CPU, MEAN, STD))
    assert [len(batch.labels) for batch in batches] == [4, 4, 2]
    images = torch.cat([batch.images for batch in batches])
    labels = torch.cat([batch.labels for batch in batches])
    assert labels.tolist() == list(range(10))
    assert torch.equal(images, normalize(split.images, MEAN, STD))
    again = next(iterate_eval(split, 4, CPU, MEAN, STD)).images
    assert torch.equal(again, batches[0][0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("augment", ["crop_flip", "randaugment"])
def test_cuda_batches_equal_cpu_batches(augment: str) -> None:
    split = _split(50, size=32)
    cpu = DeviceBatches(split, 16, CPU, MEAN, STD, augment=augment, seed=4)
    gpu = DeviceBatches(split, 16, torch.device("cuda"), MEAN, STD, augment=augment, seed=4)
    assert gpu.images.is_cuda
    for _ in range(5):
        (xc, yc, _), (xg, yg, _) = cpu.next(), gpu.next()
        assert xg.is_cuda and yg.is_cuda
        assert torch.equal(yc, yg.cpu())
        if augment == "crop_flip":
            assert torch.equal(xc, xg.cpu())
        else:  # RandAugment's float kernels may round differently on the GPU
            assert (xc - xg.cpu()).abs().max() < 0.1


def test_cutout_zeroes_one_square_clipped_at_the_border() -> None:
    images = torch.ones(2, 3, 8, 8)
    out = cutout(images, torch.tensor([5, 0]), torch.tensor([5, 0]), size=4)
    assert torch.equal(out[0, :, 3:7, 3:7], torch.zeros(3, 4, 4))
    assert int((out[0] == 0).sum()) == 3 * 16
    assert torch.equal(out[1, :, :2, :2], torch.zeros(3, 2, 2))  # centred on the corner: clipped
    assert int((out[1] == 0).sum()) == 3 * 4
    assert torch.equal(images, torch.ones(2, 3, 8, 8))  # the input is left alone


def test_batches_with_cutout_zero_a_square_in_every_image() -> None:
    split = _split(16)
    plain = DeviceBatches(split, 8, "cpu", MEAN, STD, augment="none", seed=3).next()[0]
    holed = DeviceBatches(split, 8, "cpu", MEAN, STD, augment="none", seed=3, cutout=4).next()[0]
    zeroed = (holed == 0) & (plain != 0)
    assert all(int(zeroed[i].sum()) >= 3 * 4 for i in range(8))  # at least the clipped 2×2
    assert torch.equal(holed[~zeroed], plain[~zeroed])
