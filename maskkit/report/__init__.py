"""Reporting: classification metrics, their rich table, and the figures of a run's report."""

from maskkit.report.metrics import auc_score, classification_metrics, metrics_table, print_metrics
from maskkit.report.plots import (
    plot_confusion_matrix,
    plot_grouped_bars,
    plot_mask_grid,
    plot_training_curves,
)

__all__ = [
    "auc_score",
    "classification_metrics",
    "metrics_table",
    "plot_confusion_matrix",
    "plot_grouped_bars",
    "plot_mask_grid",
    "plot_training_curves",
    "print_metrics",
]
