"""An example third-party maskkit plugin: the ``checkerboard`` masking policy."""

from maskkit_checkerboard.policy import CheckerboardMasking

__all__ = ["CheckerboardMasking"]
