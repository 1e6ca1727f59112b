"""A forest plot: paired differences to a baseline with their intervals, a panel per metric.

Each panel draws, for every policy (one row each, top to bottom in the given order), the mean
difference as a dot and its interval as a horizontal line, a vertical line at 0, and, when given,
a grey band of ± the minimum detectable effect: a difference inside the band is one the suite
could not reliably have seen. A dot is filled where its interval excludes 0, hollow otherwise.
Drawn with matplotlib's object API (no pyplot, so no display backend: PNG through Agg).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from matplotlib.figure import Figure

from maskkit.report.plots import DEFAULT_DPI, _message_figure, _save, _short

__all__ = ["plot_forest"]

#: ``(mean, low, high)``: low and high None where there is no interval.
Point = tuple[float, float | None, float | None]


def _excludes_zero(low: float | None, high: float | None) -> bool:
    return low is not None and high is not None and (low > 0 or high < 0)


def plot_forest(
    rows: Mapping[str, Mapping[str, Mapping[str, Point]]],
    path: Path,
    xlabel: str,
    title: str,
    *,
    bands: Mapping[str, Mapping[str, float | None]] | None = None,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Forest plots in a grid: a row of panels per key of ``rows`` (e.g. a dataset), a panel per
    metric.

    Args:
        rows: row title → panel title (a metric) → label (a policy) → :data:`Point`. Labels are
            drawn top to bottom in their order; a panel without points says so.
        path: where to write the PNG.
        xlabel: x-axis label of every panel (the difference's unit).
        title: figure title.
        bands: row title → panel title → half-width of the grey band around 0 (None: none).
        dpi: resolution of the PNG.

    Returns:
        ``path``.
    """
    if not rows or not any(any(panel for panel in panels.values()) for panels in rows.values()):
        return _save(_message_figure("no paired differences", title), path, dpi)
    columns = max(len(panels) for panels in rows.values())
    labels = max((len(points) for panels in rows.values() for points in panels.values()), default=1)
    fig = Figure(figsize=(2.6 * columns + 1.4, (0.28 * labels + 1.2) * len(rows) + 0.6), layout="constrained")
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for row, (row_title, panels) in zip(axes, rows.items(), strict=True):
        names: list[str] = []  # every label of the row, so that its panels share the rows
        for points in panels.values():
            names += [name for name in points if name not in names]
        for index, ax in enumerate(row):
            if index >= len(panels):
                ax.set_axis_off()
                continue
            panel_title = list(panels)[index]
            band = (bands or {}).get(row_title, {}).get(panel_title)
            _draw_panel(ax, names, panels[panel_title], band, show_labels=index == 0)
            ax.set_title(f"{row_title}: {panel_title}", fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
    fig.suptitle(title)
    return _save(fig, path, dpi)


def _draw_panel(
    ax, names: list[str], points: Mapping[str, Point], band: float | None, show_labels: bool
) -> None:
    """One panel: a row per name (the first on top; a name without a point stays empty), the
    zero line and the MDE band."""
    ax.axvline(0.0, color="black", linewidth=0.8)
    if band is not None and math.isfinite(band):
        ax.axvspan(-band, band, color="0.85", zorder=0, label="± MDE")
    for position, name in enumerate(names):
        if name not in points:
            continue
        mean, low, high = points[name]
        y = len(names) - 1 - position
        if low is not None and high is not None:
            ax.plot([low, high], [y, y], color="C0", linewidth=1.6, solid_capstyle="butt")
        filled = _excludes_zero(low, high)
        ax.plot(
            [mean], [y], "o", color="C0", markersize=5,
            markerfacecolor="C0" if filled else "white", markeredgewidth=1.2,
        )  # fmt: skip
    ax.set_yticks(range(len(names)), [_short(name, 22) for name in reversed(names)] if show_labels else [])
    ax.set_ylim(-0.7, max(len(names), 1) - 0.3)
    ax.tick_params(axis="both", labelsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    if not points:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes, fontsize=8)
