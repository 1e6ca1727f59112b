"""Models: the MAE on timm blocks and the classifier head."""

from maskkit.models.classifier import ClassifierHead, ViTClassifier
from maskkit.models.mae import MaskedAutoencoderViT

__all__ = ["ClassifierHead", "MaskedAutoencoderViT", "ViTClassifier"]
