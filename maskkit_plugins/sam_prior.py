"""``sam``: Segment Anything (Kirillov et al., ICCV 2023) with a checkpoint the user supplies.

The model is built as ``segment_anything.sam_model_registry[model_type](checkpoint=PATH)`` and
prompted per image by the centre point (``prompt="center"``, the default), by a centred box
(``"box"``, ``box_margin`` of the side left out on each edge), or not at all (``"auto"``: SAM's
automatic mask generator on a ``points_per_side``² grid). For a prompt, the best of SAM's three
candidate masks (by its predicted IoU) is kept: ``importance`` is the mask's probability
(sigmoid of its logits) and ``foreground`` the mask itself. In ``auto`` mode, ``importance`` is
each pixel's highest predicted IoU over the generated masks that cover it (masks of nearly the
whole image excluded) and ``foreground`` the best-scored mask.

SAM is slow on a CPU (seconds per image for ViT-B): build its store on a GPU (``device``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from maskkit.errors import ConfigError
from maskkit.hookspecs import hookimpl
from maskkit.priors.provider import FOREGROUND, IMPORTANCE, PriorProvider

PROMPTS = ("center", "box", "auto")
WEIGHTS_URL = "https://github.com/facebookresearch/segment-anything#model-checkpoints"
# In auto mode, masks covering more of the image than this are the background, not an object.
MAX_AUTO_AREA = 0.95


def _registry() -> dict:
    import segment_anything

    return segment_anything.sam_model_registry


class SamPrior(PriorProvider):
    """SAM masks prompted by the centre point, a box, or automatically; see the module docstring."""

    name = "sam"
    description = "Segment Anything with your checkpoint; prompt: centre point, box or automatic."
    provides = frozenset({IMPORTANCE, FOREGROUND})

    def __init__(
        self,
        checkpoint: str | None = None,
        model_type: str = "vit_b",
        prompt: str = "center",
        box_margin: float = 0.1,
        points_per_side: int = 8,
        device: str = "auto",
    ) -> None:
        if checkpoint is None:
            raise ConfigError(
                "prior provider 'sam' needs a SAM checkpoint: pass --option checkpoint=PATH to "
                "`maskkit priors build` (or set prior_options.checkpoint for a run); the official "
                f"weights (sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth) are "
                f"published at {WEIGHTS_URL}"
            )
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"the SAM checkpoint {path} does not exist; pass --option checkpoint=PATH with a "
                f"downloaded checkpoint (official weights: {WEIGHTS_URL})"
            )
        if model_type not in _registry():
            raise ConfigError(
                f"unknown SAM model_type '{model_type}'; use one of {', '.join(sorted(_registry()))} "
                "(the one the checkpoint was trained as)"
            )
        if prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {', '.join(PROMPTS)}, got {prompt!r}")
        if not 0 <= box_margin < 0.5:
            raise ValueError(f"box_margin must be in [0, 0.5), got {box_margin!r}")
        if int(points_per_side) < 1:
            raise ValueError(f"points_per_side must be at least 1, got {points_per_side!r}")
        self.checkpoint, self.model_type, self.prompt = path, model_type, prompt
        self.box_margin, self.points_per_side, self.device = float(box_margin), int(points_per_side), device
        self._model: Any = None

    def fingerprint(self) -> dict[str, Any]:
        """The checkpoint file's size and modification time: a replaced file rebuilds the store."""
        stat = self.checkpoint.stat()
        return {"checkpoint_bytes": stat.st_size, "checkpoint_mtime_ns": stat.st_mtime_ns}

    def model(self) -> Any:
        """The SAM model, built and loaded on first use."""
        if self._model is None:
            import torch

            device = self.device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            try:
                model = _registry()[self.model_type](checkpoint=str(self.checkpoint))
            except Exception as error:
                raise ConfigError(
                    f"could not load the SAM checkpoint {self.checkpoint} as model_type "
                    f"'{self.model_type}': {type(error).__name__}: {str(error).splitlines()[0][:200]}. "
                    "Check that model_type matches the checkpoint"
                ) from None
            self._model = model.to(device).eval()
        return self._model

    def compute(self, images: np.ndarray) -> dict[str, np.ndarray]:
        maps = [self._one(np.ascontiguousarray(image)) for image in images]
        importance = np.stack([m[0] for m in maps]).astype(np.float32)
        foreground = np.stack([m[1] for m in maps]).astype(np.float32)
        return {IMPORTANCE: importance, FOREGROUND: foreground}

    def _one(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[H, W, 3]`` uint8 RGB → (importance, foreground), both ``[H, W]``."""
        if self.prompt == "auto":
            return self._automatic(image)
        from segment_anything import SamPredictor

        model = self.model()
        predictor = SamPredictor(model)
        predictor.set_image(image)
        height, width = image.shape[:2]
        if self.prompt == "center":
            prompt = {"point_coords": np.array([[width / 2, height / 2]]), "point_labels": np.array([1])}
        else:
            m = self.box_margin
            prompt = {"box": np.array([m * width, m * height, (1 - m) * width, (1 - m) * height])}
        logits, scores, _ = predictor.predict(**prompt, multimask_output=True, return_logits=True)
        best = logits[int(np.argmax(scores))].astype(np.float64)  # [H, W]
        importance = 1.0 / (1.0 + np.exp(-np.clip(best, -60, 60)))
        return importance, (best > model.mask_threshold).astype(np.float32)

    def _automatic(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from segment_anything import SamAutomaticMaskGenerator

        generator = SamAutomaticMaskGenerator(self.model(), points_per_side=self.points_per_side)
        height, width = image.shape[:2]
        importance = np.zeros((height, width), dtype=np.float32)
        foreground = np.zeros((height, width), dtype=np.float32)
        masks = [m for m in generator.generate(image) if m["area"] < MAX_AUTO_AREA * height * width]
        for record in masks:
            score = float(np.clip(record["predicted_iou"], 0.0, 1.0))
            importance = np.maximum(importance, score * record["segmentation"])
        if masks:
            best = max(masks, key=lambda m: m["predicted_iou"] * m["stability_score"])
            foreground = best["segmentation"].astype(np.float32)
        return importance, foreground


@hookimpl
def maskkit_prior_providers() -> list[type[PriorProvider]]:
    return [SamPrior]
