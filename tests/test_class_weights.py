"""``finetune.class_balanced``: inverse-frequency class weights and the stage-2 loss they weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_context, synthetic_dataset, tiny_config

from maskkit.config import PRESETS, build_config
from maskkit.data import ImageSplit
from maskkit.engine.class_weights import class_balanced_weights, weighted_cross_entropy
from maskkit.engine.finetune import Finetuner
from maskkit.models import ClassifierHead, MaskedAutoencoderViT, ViTClassifier


def test_the_weights_are_inverse_class_frequency_with_mean_one_over_the_images():
    # 6 images of class 0, 2 of class 1, none of class 2: N = 8, K = 2 classes present.
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    weights = class_balanced_weights(labels, num_classes=3)
    assert weights.tolist() == pytest.approx([8 / (2 * 6), 8 / (2 * 2), 0.0])
    counts = torch.bincount(labels, minlength=3).float()
    assert float((counts * weights).sum()) == pytest.approx(len(labels))  # mean 1 over the images
    assert (counts * weights)[0] == pytest.approx((counts * weights)[1])  # each class weighs the same
    # A balanced split keeps plain cross-entropy's weights.
    assert class_balanced_weights(torch.arange(6) % 3, 3).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_the_weighted_loss_is_the_batch_mean_of_weighted_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, -1.0, 0.0]])
    labels = torch.tensor([0, 1, 2, 1])
    weights = torch.tensor([0.5, 2.0, 1.0])
    per_image = -torch.log_softmax(logits, dim=1)[torch.arange(4), labels]
    expected = (per_image * weights[labels]).sum() / 4
    assert float(weighted_cross_entropy(logits, labels, weights)) == pytest.approx(float(expected))
    plain = F.cross_entropy(logits, labels)
    assert float(weighted_cross_entropy(logits, labels, None)) == pytest.approx(float(plain))
    assert float(weighted_cross_entropy(logits, labels, torch.ones(3))) == pytest.approx(float(plain))
    assert abs(float(expected) - float(plain)) > 0.05  # the weights change the loss
    smoothed = weighted_cross_entropy(logits, labels, weights, label_smoothing=0.1)
    per_smoothed = F.cross_entropy(logits, labels, label_smoothing=0.1, reduction="none")
    assert float(smoothed) == pytest.approx(float((per_smoothed * weights[labels]).mean()))


def test_every_preset_leaves_class_balancing_off():
    for preset in PRESETS:
        assert build_config(preset).finetune.class_balanced is False


def _first_step_loss(tmp_path, class_balanced: bool) -> tuple[float, Finetuner]:
    """Stage 2's first training loss on an imbalanced synthetic dataset, from one fixed model."""
    config = tiny_config("random", finetune={"class_balanced": class_balanced, "batch_size": 32})
    dataset = synthetic_dataset(num_classes=3, train=40)
    labels = torch.tensor([0] * 30 + [1] * 6 + [2] * 4)  # 3/4 of train is class 0
    dataset.train = ImageSplit(images=dataset.train.images, labels=labels)
    context = quiet_context(config, dataset, tmp_path / f"run-{class_balanced}")
    torch.manual_seed(0)
    model = ViTClassifier(MaskedAutoencoderViT(config.model), ClassifierHead(config.model.embed_dim, 3, 0.0))
    finetuner = Finetuner(context, model)
    finetuner._train_step(1)
    return finetuner.running.loss / finetuner.running.count, finetuner


def test_stage2_weights_its_loss_by_the_training_split_when_asked(tmp_path):
    plain, off = _first_step_loss(tmp_path, class_balanced=False)
    balanced, on = _first_step_loss(tmp_path, class_balanced=True)
    assert off.class_weights is None
    expected = class_balanced_weights(on.context.splits.pretrain.labels, 3)
    assert on.class_weights is not None and torch.equal(on.class_weights, expected)
    assert expected[0] < 1 < expected[2]  # the majority class weighs less, the rarest more
    assert abs(balanced - plain) > 1e-3  # same model, same batch: the weights change the loss
