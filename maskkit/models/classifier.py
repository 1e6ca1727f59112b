"""Classifier head and the encoder + head model used for fine-tuning and evaluation."""

from __future__ import annotations

from torch import Tensor, nn

from maskkit.models.mae import MaskedAutoencoderViT


class ClassifierHead(nn.Module):
    """The reference head on the CLS feature: LayerNorm → Dropout → Linear. ``[B, D]`` → ``[B, classes]``."""

    def __init__(self, embed_dim: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(embed_dim, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(self.dropout(self.norm(features)))


class ViTClassifier(nn.Module):
    """The MAE's encoder (all tokens, no masking), then the head: ``[B, C, H, W]`` → ``[B, classes]``."""

    def __init__(self, mae: MaskedAutoencoderViT, head: ClassifierHead) -> None:
        super().__init__()
        self.mae = mae
        self.head = head

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.mae.features(images))
