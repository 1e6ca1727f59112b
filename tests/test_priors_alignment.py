"""Priors stay aligned with their images: through slicing and splits, through the device-side
crop and flip, on the way to the patch grid, and at every place the engine calls the policy."""

from __future__ import annotations

import pytest
import torch
from helpers import quiet_context, red_channel_priors, synthetic_dataset, tiny_config, with_priors
from torch import nn

from maskkit.config import ModelConfig
from maskkit.data import DeviceBatches, ImageSplit, iterate_eval, make_splits
from maskkit.engine.diagnostics import split_mask_statistics
from maskkit.engine.pretrain import Pretrainer
from maskkit.engine.run import build_models
from maskkit.models.mae import MaskedAutoencoderViT
from maskkit.policy import MaskBatch, MaskPolicy, decision_from_scores, policy_context
from maskkit.priors.alignment import pool_to_patches

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _red(images: torch.Tensor) -> torch.Tensor:
    """The uint8 red channel ``[B, H, W]`` back from normalised images ``[B, 3, H, W]``."""
    return ((images[:, 0] * STD[0] + MEAN[0]) * 255).round().to(torch.uint8)


def _split(count: int = 40, size: int = 12, seed: int = 0) -> ImageSplit:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(1, 256, (count, 3, size, size), generator=generator, dtype=torch.uint8)
    split = ImageSplit(images, torch.arange(count))
    return ImageSplit(split.images, split.labels, red_channel_priors(split))


@pytest.mark.parametrize("augment", ["crop_flip", "none"])
def test_a_prior_follows_its_image_through_crop_and_flip(augment) -> None:
    split = _split()
    batches = DeviceBatches(
        split, 16, "cpu", MEAN, STD, augment=augment, seed=7, priors=["importance", "foreground"]
    )
    plain = DeviceBatches(split, 16, "cpu", MEAN, STD, augment=augment, seed=7)
    padded = 0
    for _ in range(6):
        batch, reference = batches.next(), plain.next()
        # The priors draw no random numbers: the images are those of a run without priors.
        assert torch.equal(batch.images, reference.images) and torch.equal(batch.labels, reference.labels)
        red = _red(batch.images)
        importance = batch.priors["importance"]
        assert importance.shape == red.shape and importance.dtype == torch.float32
        assert torch.equal((importance * 255).round().to(torch.uint8), red)  # pixel for pixel
        assert torch.equal(batch.priors["foreground"], (red >= 128).float())
        padded += int((red == 0).sum())  # the crop's zero padding: zero prior there too
    assert (padded > 0) == (augment == "crop_flip")


def test_randaugment_is_refused_with_priors() -> None:
    with pytest.raises(ValueError, match="RandAugment"):
        DeviceBatches(_split(), 4, "cpu", MEAN, STD, augment="randaugment", priors=["importance"])


def test_eval_batches_serve_the_priors_in_order() -> None:
    split = _split(10)
    batches = list(iterate_eval(split, 4, "cpu", MEAN, STD, priors=["importance"]))
    assert [len(batch.labels) for batch in batches] == [4, 4, 2]
    for batch in batches:
        assert torch.equal((batch.priors["importance"] * 255).round().to(torch.uint8), _red(batch.images))


def test_slices_subsets_and_mlo_splits_keep_priors_aligned() -> None:
    dataset = with_priors(synthetic_dataset(size=8, train=40), red_channel_priors)
    splits = make_splits(dataset, train_portion=0.75)
    for name in ("pretrain", "finetune", "mask_val", "eval", "test"):
        split = getattr(splits, name)
        assert torch.equal(split.priors["importance"], split.images[:, 0]), name
    subset = splits.pretrain.subset(torch.tensor([5, 1, 3]))
    assert torch.equal(subset.priors["importance"], subset.images[:, 0])
    with pytest.raises(ValueError, match="prior 'importance' must be uint8"):
        ImageSplit(subset.images, subset.labels, {"importance": subset.priors["importance"][:2]})


def test_pooling_follows_the_mae_patch_order() -> None:
    mae = MaskedAutoencoderViT(ModelConfig(img_size=12, patch_size=4, embed_dim=8, num_heads=2, depth=1))
    pixel_map = torch.rand(3, 12, 12)
    expected = mae.patchify(pixel_map.unsqueeze(1).expand(-1, 3, -1, -1)).mean(dim=-1)  # [B, L]
    assert torch.allclose(pool_to_patches(pixel_map, 4), expected)
    # A single bright pixel lands in the patch that patchify puts it in: row 1, column 2.
    spot = torch.zeros(1, 12, 12)
    spot[0, 5, 9] = 1.0
    assert pool_to_patches(spot, 4).argmax().item() == 1 * 3 + 2


class PriorWitness(MaskPolicy):
    """A learnable test policy that records, at every call, whether the pooled prior it was given
    is the pooled red channel of the images it was given, and reads the prior in its regularizer."""

    name = "prior-witness"
    learnable = True
    requires = frozenset({"importance"})

    def __init__(self, context) -> None:
        super().__init__(context)
        self.logits = nn.Parameter(torch.zeros(context.num_patches))
        self.seen: list[bool] = []

    def forward(self, batch: MaskBatch):
        images = batch.images.float()
        red = ((images[:, 0] * STD[0] + MEAN[0]) * 255).round() / 255  # [B, H, W]
        expected = pool_to_patches(red, self.context.patch_size)
        self.seen.append(torch.allclose(batch.priors["importance"].float(), expected, atol=1e-5))
        prob = (self.logits + batch.priors["importance"]).sigmoid()  # [B, L]
        return decision_from_scores(prob, batch.mask_ratio, weights=prob)

    def regularizer(self, decision, batch):
        return (decision.weights * batch.priors["importance"]).mean()


def test_every_level_that_calls_the_policy_sees_priors_aligned_with_its_images(tmp_path) -> None:
    config = tiny_config("mlo-light", pretrain={"augment": "crop_flip"})
    dataset = with_priors(synthetic_dataset(size=8), red_channel_priors)
    assert (dataset.mean, dataset.std) == (MEAN, STD)
    context = quiet_context(config, dataset, tmp_path / "run")
    mae, _, head = build_models(config, dataset.num_classes, context.device)
    policy = PriorWitness(policy_context(mae))
    pretrainer = Pretrainer(context, mae, policy, head)
    pretrainer.mlo.step(1)  # pretrain step, its hypergradient pair, finetune, mask + regularizer
    assert len(policy.seen) >= 3 and all(policy.seen)
    split_mask_statistics(
        mae,
        policy,
        context.splits.eval,
        0.5,
        pretrainer.weighting,
        8,
        MEAN,
        STD,
        context.autocast,
        ["importance"],
    )
    assert all(policy.seen)
