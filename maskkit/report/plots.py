"""Figures for a run's report: confusion matrix, training curves, mask grids, bar comparisons.

Every function draws on a fresh :class:`matplotlib.figure.Figure` (no pyplot, so no global
state and no GUI backend is touched), writes a PNG to ``path`` (creating parent folders) and
returns ``path`` as a :class:`~pathlib.Path`.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

__all__ = [
    "plot_confusion_matrix",
    "plot_grouped_bars",
    "plot_mask_grid",
    "plot_training_curves",
]

DEFAULT_DPI = 150
MAX_LABEL_CHARS = 18
ANNOTATE_MAX_CLASSES = 30
MASK_GRID_TITLES: tuple[str, ...] = ("original", "masked", "reconstruction", "mask probability")
# Keys of a metrics.jsonl row that are bookkeeping, not metrics.
NON_METRIC_KEYS = frozenset({"step", "epoch", "stage", "time", "timestamp", "wall_time"})
LR_PREFIX = "lr/"
# Keys read together share a panel: (panel title, keys or a key prefix ending in "/").
SHARED_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("learning rate", (LR_PREFIX,)),
    ("hypergradient norm (log scale)", ("hypergradient/",)),
    ("mask probability: all, masked, kept patches", ("mask/prob_mean", "mask/prob_masked", "mask/prob_kept")),
    ("pretrain loss (weighted) and masked-patch error", ("loss/pretrain", "pretrain/masked_error")),
    ("val accuracy and the majority-class rate", ("val/accuracy", "val/majority_rate")),
    ("masked share of the patches, by prior", ("guidance/",)),
    ("learned policy parameters", ("policy/",)),
)
LOG_SCALE_PANELS = frozenset({"hypergradient norm (log scale)"})


def panel_of(key: str) -> str:
    """The panel a metric is drawn in: a shared one from :data:`SHARED_PANELS`, or its own."""
    for title, members in SHARED_PANELS:
        if any(key == m or (m.endswith("/") and key.startswith(m)) for m in members):
            return title
    return key


def panel_title(panel: str, keys: set[str]) -> str:
    """The title of a panel holding ``keys``: a shared panel's own title when every key it names
    was logged, else the keys it has, so that no title promises a line the panel lacks (a
    ``random`` run logs ``val/accuracy`` but no ``val/majority_rate``)."""
    members = dict(SHARED_PANELS).get(panel)
    if members is None or any(member.endswith("/") for member in members):
        return panel
    present = [member for member in members if member in keys]
    return panel if len(present) == len(members) else ", ".join(present)


def _save(fig: Figure, path: Path | str, dpi: int) -> Path:
    """Write ``fig`` to ``path`` (parents created) and release its artists."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    fig.clear()
    return out


def _message_figure(text: str, title: str) -> Figure:
    """A small figure that only says ``text``: for empty inputs."""
    fig = Figure(figsize=(4.0, 3.0), layout="constrained")
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, transform=ax.transAxes)
    ax.set_axis_off()
    fig.suptitle(title)
    return fig


def _short(name: str, limit: int = MAX_LABEL_CHARS) -> str:
    """``name`` cut to ``limit`` characters, the last one an ellipsis when cut."""
    name = str(name)
    return name if len(name) <= limit else name[: limit - 1].rstrip() + "\u2026"


# --------------------------------------------------------------------------- confusion matrix


def plot_confusion_matrix(
    matrix: list[list[int]] | np.ndarray,
    class_names: list[str],
    path: Path,
    title: str = "Confusion matrix",
    normalize: bool = True,
    *,
    dpi: int | None = None,
) -> Path:
    """Heatmap of a confusion matrix, rows = true class, columns = predicted class.

    With ``normalize`` the colours are row-normalised (fraction of each true class; rows with no
    samples stay 0) and every cell is annotated with its raw count. Above
    ``ANNOTATE_MAX_CLASSES`` classes (e.g. CIFAR-100) cells are not annotated. Tick labels are
    the class names, cut to ``MAX_LABEL_CHARS`` characters with an ellipsis.

    Args:
        matrix: ``[C, C]`` counts.
        class_names: C class names.
        path: where to write the PNG.
        title: figure title.
        normalize: colour by row fraction (True) or by raw count (False).
        dpi: resolution of the PNG; default 150, or 100 above ``ANNOTATE_MAX_CLASSES`` classes
            (the figure is then large already).

    Returns:
        ``path``.

    Raises:
        ValueError: if ``matrix`` is not square or does not match ``len(class_names)``.
    """
    counts = np.asarray(matrix, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"confusion matrix must be square [C, C], got shape {counts.shape}")
    num_classes = counts.shape[0]
    if len(class_names) != num_classes:
        raise ValueError(
            f"confusion matrix is {num_classes}x{num_classes} but {len(class_names)} class names were given"
        )
    if dpi is None:
        dpi = DEFAULT_DPI if num_classes <= ANNOTATE_MAX_CLASSES else 100
    if num_classes == 0:
        return _save(_message_figure("no classes", title), path, dpi)

    if normalize:
        row_sums = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, row_sums, out=np.zeros_like(counts), where=row_sums > 0)
        vmax, cbar_label = 1.0, "fraction of true class"
    else:
        values = counts
        vmax, cbar_label = max(float(counts.max()), 1.0), "count"

    # Cells shrink from 0.55 in towards 0.22 in as C grows; the figure is capped at ~26 in.
    cell = 0.55 if num_classes <= 10 else max(0.22, 0.55 - 0.0035 * (num_classes - 10))
    labels = [_short(n) for n in class_names]
    label_room = 0.09 * max(len(s) for s in labels) + 0.6  # inches for the tick labels
    side = num_classes * cell
    fig = Figure(figsize=(side + label_room + 1.6, side + label_room + 0.8), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    tick_size = min(9.0, 0.45 * 72 * cell)  # at most ~45% of a cell's height, in points
    text_scale = max(1.0, side / 12)  # keep titles legible on the large figures
    colorbar = fig.colorbar(image, ax=ax, shrink=0.8)
    colorbar.set_label(cbar_label, fontsize=10 * text_scale)
    colorbar.ax.tick_params(labelsize=8 * text_scale)
    ticks = np.arange(num_classes)
    ax.set_xticks(ticks, labels, rotation=60, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, labels)
    ax.tick_params(labelsize=tick_size)
    ax.set_xlabel("predicted", fontsize=10 * text_scale)
    ax.set_ylabel("true", fontsize=10 * text_scale)
    ax.set_title(title, fontsize=12 * text_scale)

    if num_classes <= ANNOTATE_MAX_CLASSES:
        text_size = 9 if num_classes <= 10 else 7 if num_classes <= 20 else 5
        for i in range(num_classes):
            for j in range(num_classes):
                dark = values[i, j] > 0.55 * vmax
                ax.text(
                    j,
                    i,
                    f"{counts[i, j]:.0f}",
                    ha="center",
                    va="center",
                    fontsize=text_size,
                    color="white" if dark else "black",
                )
    return _save(fig, path, dpi)


# --------------------------------------------------------------------------- training curves


def _is_number(value: Any) -> bool:
    """True for ints and floats (including numpy scalars), False for bools and the rest."""
    return isinstance(value, Real) and not isinstance(value, bool | np.bool_)


def _collect_series(
    records: Sequence[Mapping[str, Any]],
) -> dict[str, dict[tuple[str, str], list[tuple[float, float]]]]:
    """Group records into panels: panel name -> (stage, key) -> [(step, value), ...].

    Every numeric key is its own panel, except those :func:`panel_of` groups (all ``lr/*``
    keys share ``"learning rate"``, for example). Panels keep the order in which their first key
    appears. A row without ``step`` gets the count of rows seen so far in its stage.
    """
    panels: dict[str, dict[tuple[str, str], list[tuple[float, float]]]] = {}
    seen_per_stage: dict[str, int] = {}
    for row in records:
        stage = str(row.get("stage", "run"))
        index = seen_per_stage.get(stage, 0)
        seen_per_stage[stage] = index + 1
        step = row.get("step")
        x = float(step) if _is_number(step) else float(index)
        for key, value in row.items():
            if key in NON_METRIC_KEYS or not _is_number(value):
                continue
            panel = panel_of(key)
            panels.setdefault(panel, {}).setdefault((stage, key), []).append((x, float(value)))
    return panels


def plot_training_curves(
    records: list[dict],
    path: Path,
    title: str = "Training curves",
    *,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """One subplot per metric of a ``metrics.jsonl`` log, x = step, one line per stage.

    Rows carry ``stage`` and ``step`` plus any numeric keys; keys missing from some rows are
    fine. ``step``, ``epoch``, ``stage``, ``time``/``timestamp``/``wall_time`` and non-numeric
    values are not plotted; keys read together share a subplot (:data:`SHARED_PANELS`: the
    learning rates, the hypergradient norms on a log scale, the mask probabilities, the weighted
    loss beside the masked-patch error, val accuracy beside the majority rate). Subplots are laid
    out in a grid of at most 3 columns. An empty list (or one without numeric metrics) gives a
    figure that says so.

    Args:
        records: rows of ``metrics.jsonl``, e.g.
            ``{"stage": "pretrain", "step": 10, "loss/pretrain": 0.8, "lr/pretrain": 1e-4}``.
        path: where to write the PNG.
        title: figure title.
        dpi: resolution of the PNG.

    Returns:
        ``path``.
    """
    if not records:
        return _save(_message_figure("no records", title), path, dpi)
    panels = _collect_series(records)
    if not panels:
        return _save(_message_figure("no numeric metrics in the records", title), path, dpi)

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.2 * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, (panel, series) in zip(axes.flat, panels.items(), strict=False):
        stages = {stage for stage, _ in series}
        for (stage, key), points in series.items():
            points.sort(key=lambda p: p[0])
            xs = [p[0] for p in points]
            ys = [p[1] for p in points]
            if panel != key:
                label = key if len(stages) == 1 else f"{key} ({stage})"
            else:
                label = stage
            ax.plot(xs, ys, label=label, marker="o" if len(points) == 1 else None, linewidth=1.4)
        ax.set_title(panel_title(panel, {key for _, key in series}), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if panel in LOG_SCALE_PANELS and all(y > 0 for points in series.values() for _, y in points):
            ax.set_yscale("log")
        elif panel == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.legend(fontsize=8, loc="best")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_axis_off()
    fig.suptitle(title)
    return _save(fig, path, dpi)


# --------------------------------------------------------------------------- mask grid


def _as_images(array: np.ndarray, name: str) -> np.ndarray:
    """Check a batch of images and return it as float ``[N, H, W, 3]`` clipped to [0, 1].

    Accepts ``[N, H, W, 3]`` or ``[N, H, W, 1]`` (repeated to 3 channels); integer arrays are
    taken as 0..255.
    """
    arr = np.asarray(array)
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        hint = ""
        if arr.ndim == 4 and arr.shape[1] in (1, 3):
            hint = " (it looks channels-first [N, C, H, W]; transpose to [N, H, W, C])"
        raise ValueError(f"{name} must be [N, H, W, 3] images, got shape {arr.shape}{hint}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} holds no images (shape {arr.shape})")
    arr = arr.astype(np.float64) / 255.0 if np.issubdtype(arr.dtype, np.integer) else arr
    arr = np.clip(np.nan_to_num(arr.astype(np.float64)), 0.0, 1.0)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr


def _check_maps(maps: np.ndarray, name: str, num_images: int, height: int, width: int) -> np.ndarray:
    """Per-image maps ``[N, h, w]`` (a patch grid or per pixel) as floats clipped to [0, 1]."""
    values = np.asarray(maps, dtype=np.float64)
    if values.ndim == 2 and num_images == 1:
        values = values[None]
    if values.ndim != 3 or values.shape[0] != num_images:
        raise ValueError(
            f"{name} must be [N, h, w] with N = {num_images} (one per image), got shape {np.shape(maps)}"
        )
    if min(values.shape[1:]) == 0 or values.shape[1] > height or values.shape[2] > width:
        raise ValueError(
            f"{name} grid {values.shape[1]}x{values.shape[2]} does not fit the "
            f"{height}x{width} images; pass per-patch values on the patch grid"
        )
    return np.clip(np.nan_to_num(values), 0.0, 1.0)


def plot_mask_grid(
    originals: np.ndarray,
    masked: np.ndarray,
    reconstructions: np.ndarray,
    path: Path,
    heatmaps: np.ndarray | Mapping[str, np.ndarray] | None = None,
    titles: tuple[str, ...] | None = None,
    row_labels: list[str] | None = None,
    *,
    priors: np.ndarray | None = None,
    prior_label: str = "prior",
    title: str | None = None,
    dpi: int = DEFAULT_DPI,
    cell_inches: float = 1.6,
) -> Path:
    """Grid of original -> masked -> reconstruction (-> per-patch maps), one row per image.

    As in the MAE and MLO-MAE papers' figures. Pixels are shown with nearest interpolation. Each
    heatmap is upsampled (nearest) from the patch grid to the image and drawn over the original,
    with one colorbar per column, labelled with the column's title. With ``priors`` the columns
    are original -> prior -> heatmaps -> masked -> reconstruction: what the policy read, what it
    made of it, the mask it drew and the result.

    Args:
        originals: ``[N, H, W, 3]`` floats in [0, 1] (clipped; ``[N, H, W, 1]`` also accepted).
        masked: ``[N, H, W, 3]``, the same shape as ``originals``.
        reconstructions: ``[N, H, W, 3]``, the same shape as ``originals``.
        path: where to write the PNG.
        heatmaps: optional per-patch values in [0, 1] (clipped) on the patch grid: one
            ``[N, h, w]`` array (the "mask probability" column), or a mapping from column title
            to such an array (one column each, e.g. ``{"mask probability": ..., "predicted
            loss": ...}``).
        titles: column titles, one per column; default ``("original", "masked",
            "reconstruction")`` followed by the heatmaps' titles, or with priors ``("original",
            prior_label, *heatmap titles, "masked", "reconstruction")``.
        row_labels: optional N labels (e.g. class names) written left of each row.
        priors: optional ``[N, h, w]`` prior maps in [0, 1], per pixel or on the patch grid.
        prior_label: the prior column's title and colorbar label.
        title: optional figure title above the columns (e.g. the run and its checkpoint).
        dpi: resolution of the PNG.
        cell_inches: size of one image cell.

    Returns:
        ``path``.

    Raises:
        ValueError: on shapes that are not images, or that disagree, or on label/title counts
            that do not match.
    """
    orig = _as_images(originals, "originals")
    mask = _as_images(masked, "masked")
    recon = _as_images(reconstructions, "reconstructions")
    for name, arr in (("masked", mask), ("reconstructions", recon)):
        if arr.shape != orig.shape:
            raise ValueError(
                f"{name} has shape {np.shape(masked if name == 'masked' else reconstructions)} "
                f"but originals has shape {np.shape(originals)}; all three must be the same "
                "[N, H, W, 3]"
            )
    num_images, height, width, _ = orig.shape
    named = (
        {}
        if heatmaps is None
        else dict(heatmaps)
        if isinstance(heatmaps, Mapping)
        else {MASK_GRID_TITLES[3]: heatmaps}
    )
    heat = {
        title: _check_maps(values, f"heatmaps '{title}'", num_images, height, width)
        for title, values in named.items()
    }
    prior = None if priors is None else _check_maps(priors, "priors", num_images, height, width)

    # Each column: (default title, images, overlay maps or None, colour map).
    heat_columns = [(title, orig, values, "inferno") for title, values in heat.items()]
    plain = [("masked", mask, None, ""), ("reconstruction", recon, None, "")]
    columns: list[tuple[str, np.ndarray, np.ndarray | None, str]] = [("original", orig, None, "")]
    if prior is None:
        columns += plain + heat_columns
    else:
        columns += [(prior_label, orig, prior, "viridis"), *heat_columns, *plain]
    ncols = len(columns)
    col_titles = tuple(column[0] for column in columns) if titles is None else tuple(titles)
    if len(col_titles) < ncols:
        raise ValueError(f"titles needs {ncols} entries (one per column), got {len(col_titles)}")
    if row_labels is not None and len(row_labels) != num_images:
        raise ValueError(f"row_labels has {len(row_labels)} entries for {num_images} images")

    overlays = sum(column[2] is not None for column in columns)
    label_room = 0.5 if row_labels is not None else 0.0
    colorbar_room = 0.7 * overlays
    fig = Figure(
        figsize=(ncols * cell_inches + label_room + colorbar_room, num_images * cell_inches + 0.3),
        layout="constrained",
    )
    axes = fig.subplots(num_images, ncols, squeeze=False)
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)  # heatmap cells cover the pixel grid
    drawn: dict[int, Any] = {}
    for i in range(num_images):
        for j, (_, images, maps, cmap) in enumerate(columns):
            ax = axes[i, j]
            ax.imshow(images[i], interpolation="nearest")
            if maps is not None:
                drawn[j] = ax.imshow(
                    maps[i], cmap=cmap, vmin=0.0, vmax=1.0, alpha=0.6, interpolation="nearest", extent=extent
                )
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if i == 0:
                ax.set_title(col_titles[j], fontsize=9)
        if row_labels is not None:
            axes[i, 0].set_ylabel(_short(row_labels[i], 14), fontsize=8)
    for j, overlay in drawn.items():
        fig.colorbar(overlay, ax=axes[:, j].tolist(), label=col_titles[j], shrink=0.9)
    if title:  # wrapped to the figure's width (about 12 characters an inch at 9 pt)
        fig.suptitle(textwrap.fill(title, width=max(24, int(fig.get_figwidth() * 12))), fontsize=9)
    return _save(fig, path, dpi)


# --------------------------------------------------------------------------- grouped bars


def plot_grouped_bars(
    panels: Mapping[str, Mapping[str, Mapping[str, tuple[float, float | None]]]],
    path: Path,
    ylabel: str,
    title: str,
    *,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Grouped bar charts with error bars, one panel per key of ``panels`` (stacked).

    Args:
        panels: panel title (e.g. a dataset) → group name (e.g. a policy) → series name (e.g. a
            metric) → ``(height, error)``; the error bar spans ± error (None: no bar). Groups
            and series are drawn in the order they first appear; a series a group lacks leaves
            a gap. Non-finite heights are left out.
        path: where to write the PNG.
        ylabel: y-axis label of every panel.
        title: figure title.
        dpi: resolution of the PNG.

    Returns:
        ``path``.
    """
    if not panels or not any(panels.values()):
        return _save(_message_figure("no values", title), path, dpi)
    series: list[str] = []
    for groups in panels.values():
        for values in groups.values():
            series += [name for name in values if name not in series]
    largest = max(len(groups) for groups in panels.values())
    width = 0.8 / max(1, len(series))
    fig = Figure(
        figsize=(max(6.0, 0.25 * largest * len(series) + 2.0), 3.6 * len(panels) + 0.6), layout="constrained"
    )
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (panel, groups) in zip(axes, panels.items(), strict=True):
        names = list(groups)
        for index, name in enumerate(series):
            offsets, heights, errors = [], [], []
            for position, group in enumerate(names):
                height, error = groups[group].get(name, (float("nan"), None))
                if _is_number(height) and math.isfinite(height):
                    offsets.append(position + (index - (len(series) - 1) / 2) * width)
                    heights.append(float(height))
                    errors.append(float(error) if _is_number(error) and math.isfinite(error) else 0.0)
            ax.bar(
                offsets, heights, width, yerr=errors, capsize=2, color=f"C{index % 10}",
                label=name, error_kw={"elinewidth": 0.8},
            )  # fmt: skip
        labels = [_short(name, 24) for name in names]
        ax.set_xticks(range(len(names)), labels, rotation=35, ha="right", rotation_mode="anchor")
        ax.set_ylabel(ylabel)
        ax.set_title(panel)
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(series)), fontsize=8)
    fig.suptitle(title)
    return _save(fig, path, dpi)
