"""Tests for maskkit.report.plots: every figure is a real, non-trivial PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskkit.report import (
    plot_confusion_matrix,
    plot_mask_grid,
    plot_training_curves,
)
from maskkit.report.plots import _collect_series

DERMA = [
    "actinic keratoses and intraepithelial carcinoma",
    "basal cell carcinoma",
    "benign keratosis-like lesions",
    "dermatofibroma",
    "melanoma",
    "melanocytic nevi",
    "vascular lesions",
]


def _open_png(path: Path, min_side: int = 200) -> Image.Image:
    """Check ``path`` is a PNG of a sensible size and return it, loaded, as RGB."""
    assert path.is_file()
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.mode in ("RGB", "RGBA")
        assert min(img.size) >= min_side, img.size
        img.load()
        return img.convert("RGB")


def _distinct_colours(img: Image.Image | np.ndarray) -> int:
    """Number of distinct RGB colours (packed to one int each: fast on big images)."""
    rgb = np.asarray(img, dtype=np.uint32).reshape(-1, 3)
    return len(np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]))


def _images(n: int = 3, size: int = 32, seed: int = 0) -> np.ndarray:
    """``[n, size, size, 3]`` smooth random images in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    base = np.stack([xx, yy, 1 - xx], axis=-1)
    return np.clip(base[None] * rng.uniform(0.5, 1.0, (n, 1, 1, 3)), 0, 1)


# --------------------------------------------------------------------------- confusion matrix


def test_confusion_matrix_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 30, (7, 7)) + np.diag(rng.integers(50, 100, 7))
    out = tmp_path / "nested" / "dir" / "cm.png"
    result = plot_confusion_matrix(matrix.tolist(), DERMA, out)
    assert result == out
    img = _open_png(out)
    assert _distinct_colours(img) > 20


def test_confusion_matrix_scales_with_classes(tmp_path: Path) -> None:
    small = plot_confusion_matrix(np.eye(3, dtype=int), ["a", "b", "c"], tmp_path / "s.png")
    names = [f"class_{i}" for i in range(100)]
    big = plot_confusion_matrix(np.eye(100, dtype=int) * 5, names, tmp_path / "b.png", normalize=False)
    with Image.open(small) as s, Image.open(big) as b:
        assert b.size[0] > 2 * s.size[0]
        assert b.size[1] > 2 * s.size[1]


def test_confusion_matrix_zero_rows_ok(tmp_path: Path) -> None:
    matrix = np.array([[3, 1], [0, 0]])  # class 1 has no samples: no division by zero
    with np.errstate(all="raise"):
        _open_png(plot_confusion_matrix(matrix, ["a", "b"], tmp_path / "cm.png"))


@pytest.mark.parametrize(
    ("matrix", "names"),
    [(np.zeros((2, 3)), ["a", "b"]), (np.zeros((3, 3)), ["a", "b"])],
)
def test_confusion_matrix_bad_shapes(tmp_path: Path, matrix: np.ndarray, names: list) -> None:
    with pytest.raises(ValueError, match="confusion matrix"):
        plot_confusion_matrix(matrix, names, tmp_path / "cm.png")


# --------------------------------------------------------------------------- training curves


def _records() -> list[dict]:
    rows: list[dict] = []
    for step in range(0, 100, 10):
        rows.append(
            {
                "stage": "pretrain",
                "step": step,
                "epoch": step // 50,
                "time": 1.5 * step,
                "loss/pretrain": 1.0 / (step + 1),
                "loss/mask": 0.5 - step / 1000,
                "lr/pretrain": 1e-4 * step / 100,
                "images_per_s": 900.0 + step,
            }
        )
    for step in range(0, 50, 5):
        rows.append({"stage": "finetune", "step": step, "loss/finetune": 2.0 / (step + 1)})
        rows.append({"stage": "finetune", "step": step, "lr/finetune": 1e-3, "note": "warmup"})
    rows.append({"stage": "finetune", "step": 50, "val/accuracy": 0.8, "eval/accuracy": 0.7})
    rows.append({"stage": "finetune", "step": 50, "train/loss": 0.3, "flag": True})
    return rows


def test_training_curves_png(tmp_path: Path) -> None:
    out = plot_training_curves(_records(), tmp_path / "plots" / "curves.png")
    img = _open_png(out, min_side=400)
    # 8 panels -> 3 columns x 3 rows of 4.6 x 3.2 in at 150 dpi.
    assert img.size[0] > 1.5 * 4.6 * 150 and img.size[1] > 2 * 3.2 * 150
    assert _distinct_colours(img) > 20


def test_training_curves_panels() -> None:
    panels = _collect_series(_records())
    assert list(panels) == [
        "pretrain loss (weighted) and masked-patch error",
        "loss/mask",
        "learning rate",
        "images_per_s",
        "loss/finetune",
        "val accuracy and the majority-class rate",
        "eval/accuracy",
        "train/loss",
    ]  # no step/epoch/time/stage, no strings ("note"), no bools ("flag")
    lr_lines = {("pretrain", "lr/pretrain"), ("finetune", "lr/finetune")}
    assert set(panels["learning rate"]) == lr_lines
    assert set(panels["loss/mask"]) == {("pretrain", "loss/mask")}
    assert panels["loss/finetune"][("finetune", "loss/finetune")][2] == (10.0, 2.0 / 11)


def test_diagnostics_read_together_share_a_panel() -> None:
    rows = [
        {"stage": "pretrain", "step": 1, "loss/pretrain": 0.2, "pretrain/masked_error": 0.9},
        {
            "stage": "pretrain",
            "step": 1,
            "mask/prob_masked": 0.6,
            "mask/prob_kept": 0.3,
            "mask/prob_std": 0.1,
        },
        {"stage": "pretrain", "step": 2, "hypergradient/total_norm": 2.0, "hypergradient/pretrain_norm": 0.5},
        {"stage": "pretrain", "step": 2, "val/accuracy": 0.66, "val/majority_rate": 0.67},
    ]
    panels = {title: {key for _, key in series} for title, series in _collect_series(rows).items()}
    assert panels == {
        "pretrain loss (weighted) and masked-patch error": {"loss/pretrain", "pretrain/masked_error"},
        "mask probability: all, masked, kept patches": {"mask/prob_masked", "mask/prob_kept"},
        "mask/prob_std": {"mask/prob_std"},
        "hypergradient norm (log scale)": {"hypergradient/total_norm", "hypergradient/pretrain_norm"},
        "val accuracy and the majority-class rate": {"val/accuracy", "val/majority_rate"},
    }


def test_training_curves_grid_layout(tmp_path: Path) -> None:
    one = plot_training_curves([{"stage": "a", "step": 0, "x": 1.0}], tmp_path / "one.png")
    many = plot_training_curves(_records(), tmp_path / "many.png")
    with Image.open(one) as a, Image.open(many) as b:
        assert b.size[0] == pytest.approx(3 * a.size[0], rel=0.05)  # at most 3 columns


def test_training_curves_empty(tmp_path: Path) -> None:
    _open_png(plot_training_curves([], tmp_path / "empty.png"))
    only_text = [{"stage": "pretrain", "step": 1, "note": "hello"}]
    _open_png(plot_training_curves(only_text, tmp_path / "nothing.png"))


# --------------------------------------------------------------------------- mask grid


def test_mask_grid_with_heatmaps(tmp_path: Path) -> None:
    n = 3
    originals = _images(n)
    masked = originals.copy()
    masked[:, :16, :16] = 0.5
    recon = originals + 0.2  # out of range on purpose: must be clipped, not crash
    heat = np.random.default_rng(1).random((n, 8, 8))
    out = plot_mask_grid(originals, masked, recon, tmp_path / "grid.png", heatmaps=heat, row_labels=DERMA[:n])
    img = _open_png(out)
    width, height = img.size
    # 4 columns + colourbar, n rows of ~1.6 in cells at 150 dpi
    assert width > 4 * 1.6 * 150 * 0.8
    assert height > n * 1.6 * 150 * 0.8
    # the top-left ("original") cell holds the gradient image, not a blank square
    cell = np.asarray(img)[height // (2 * n) - 40 : height // (2 * n) + 40, 60:200]
    assert _distinct_colours(cell) > 50


def test_mask_grid_without_heatmaps(tmp_path: Path) -> None:
    originals = _images(2)
    three = plot_mask_grid(originals, originals, originals, tmp_path / "three.png")
    four = plot_mask_grid(
        originals,
        originals,
        originals,
        tmp_path / "four.png",
        heatmaps=np.full((2, 4, 4), 0.5),
        titles=("a", "b", "c", "d"),
    )
    with Image.open(three) as a, Image.open(four) as b:
        assert b.size[0] > a.size[0]  # the extra heatmap column
        assert b.size[1] == a.size[1]


def test_mask_grid_draws_one_column_per_named_heatmap(tmp_path: Path) -> None:
    originals = _images(2)
    one = plot_mask_grid(
        originals, originals, originals, tmp_path / "one.png", heatmaps=np.full((2, 4, 4), 0.5)
    )
    two = plot_mask_grid(
        originals,
        originals,
        originals,
        tmp_path / "two.png",
        heatmaps={
            "mask probability": np.full((2, 4, 4), 0.5),
            "predicted loss": np.eye(4)[None].repeat(2, 0),
        },
    )
    with Image.open(one) as a, Image.open(two) as b:
        assert b.size[0] > a.size[0] * 1.2  # a fifth column with its own colorbar
        assert b.size[1] == a.size[1]
    with pytest.raises(ValueError, match="'predicted loss'"):
        plot_mask_grid(
            originals,
            originals,
            originals,
            tmp_path / "x.png",
            heatmaps={"predicted loss": np.zeros((3, 4, 4))},
        )


def test_mask_grid_original_cell_not_blank(tmp_path: Path) -> None:
    originals = _images(1)
    blank = np.zeros_like(originals)
    out = plot_mask_grid(originals, blank, blank, tmp_path / "one.png")
    img = np.asarray(_open_png(out, min_side=100))
    width = img.shape[1]
    first, second = img[:, : width // 3], img[:, width // 3 : 2 * width // 3]
    assert _distinct_colours(first) > 50
    # the black "masked" cell is mostly one colour (plus title text anti-aliasing)
    _, counts = np.unique(second.reshape(-1, 3), axis=0, return_counts=True)
    assert counts.max() > 0.3 * second.shape[0] * second.shape[1]
    assert _distinct_colours(second) < _distinct_colours(first)


def test_mask_grid_mismatched_shapes(tmp_path: Path) -> None:
    originals = _images(2)
    with pytest.raises(ValueError, match=r"reconstructions has shape .* but originals"):
        plot_mask_grid(originals, originals, _images(3), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"masked has shape"):
        plot_mask_grid(originals, originals[:, :16], originals, tmp_path / "x.png")
    with pytest.raises(ValueError, match="channels-first"):
        chw = originals.transpose(0, 3, 1, 2)
        plot_mask_grid(chw, chw, chw, tmp_path / "x.png")
    with pytest.raises(ValueError, match="heatmaps 'mask probability' must be"):
        plot_mask_grid(originals, originals, originals, tmp_path / "x.png", heatmaps=np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="row_labels"):
        plot_mask_grid(originals, originals, originals, tmp_path / "x.png", row_labels=["a"])
    with pytest.raises(ValueError, match="titles"):
        plot_mask_grid(originals, originals, originals, tmp_path / "x.png", titles=("a",))
    assert not (tmp_path / "x.png").exists()


def _drawn_titles(monkeypatch: pytest.MonkeyPatch) -> list:
    """Each figure the plots module saves, as (figure title, [subplot titles])."""
    import maskkit.report.plots as plots

    drawn = []
    save = plots._save

    def recording_save(fig, path, dpi):
        drawn.append((fig.get_suptitle(), [ax.get_title() for ax in fig.axes if ax.get_title()]))
        return save(fig, path, dpi)

    monkeypatch.setattr(plots, "_save", recording_save)
    return drawn


def test_no_panel_title_promises_a_line_the_panel_lacks(tmp_path: Path, monkeypatch) -> None:
    drawn = _drawn_titles(monkeypatch)
    # A random run: val accuracy from fine-tuning, no majority-class rate, no masked-patch error.
    random_run = [
        {"stage": "pretrain", "step": 1, "loss/pretrain": 1.0},
        {"stage": "finetune", "step": 1, "val/accuracy": 0.5},
    ]
    plot_training_curves(random_run, tmp_path / "random.png")
    mlo_run = [*random_run, {"stage": "pretrain", "step": 2, "val/majority_rate": 0.6}]
    plot_training_curves(mlo_run, tmp_path / "mlo.png")
    (_, random_titles), (_, mlo_titles) = drawn
    assert random_titles == ["loss/pretrain", "val/accuracy"]
    assert mlo_titles == ["loss/pretrain", "val accuracy and the majority-class rate"]


def test_the_mask_grid_can_carry_a_title(tmp_path: Path, monkeypatch) -> None:
    drawn = _drawn_titles(monkeypatch)
    images = np.zeros((2, 8, 8, 3))
    title = "run-1: mlo, checkpoint 'best' (mid-pretraining, step 4 of 8)"
    plot_mask_grid(images, images, images, tmp_path / "grid.png", title=title)
    plot_mask_grid(images, images, images, tmp_path / "untitled.png")
    assert [figure_title.replace("\n", " ") for figure_title, _ in drawn] == [title, ""]
