"""An example third-party maskkit plugin: the learnable ``patch-scorer`` masking policy."""

from maskkit_patch_scorer.policy import PatchScorerMasking

__all__ = ["PatchScorerMasking"]
