"""``otsu``: lesion foreground by Otsu thresholding and morphology, the classic weight-free method
for dermoscopy (Otsu, 1979; e.g. Celebi et al., "Lesion border detection in dermoscopy images",
2009). No model, no weights: it runs anywhere in milliseconds per image.

Per image: one channel (grey by default), a light Gaussian blur, Otsu's threshold (lesions are
darker than skin: ``polarity="dark"``), an opening and a closing with an elliptical kernel, one
connected component (the largest, weighted towards the centre, since dermoscopy centres the
lesion), holes filled. ``foreground`` is that binary mask; ``importance`` is 1 on it and decays
smoothly outside (a Gaussian of ``softness`` × side), so patches on the border count partly.
"""

from __future__ import annotations

import numpy as np

from maskkit.hookspecs import hookimpl
from maskkit.priors.provider import FOREGROUND, IMPORTANCE, PriorProvider

POLARITIES = ("dark", "bright", "auto")
CHANNELS = ("gray", "red", "green", "blue")
COMPONENTS = ("central", "largest", "all")


def _odd(value: float) -> int:
    side = max(3, round(value))
    return side if side % 2 else side + 1


class OtsuPrior(PriorProvider):
    """Otsu threshold + morphology lesion segmentation; see the module docstring."""

    name = "otsu"
    description = "Lesion foreground by Otsu threshold + morphology (weight-free; dermoscopy)."
    provides = frozenset({IMPORTANCE, FOREGROUND})

    def __init__(
        self,
        polarity: str = "dark",
        channel: str = "gray",
        kernel: float = 0.1,
        component: str = "central",
        softness: float = 0.05,
    ) -> None:
        for option, value, allowed in (
            ("polarity", polarity, POLARITIES),
            ("channel", channel, CHANNELS),
            ("component", component, COMPONENTS),
        ):
            if value not in allowed:
                raise ValueError(f"{option} must be one of {', '.join(allowed)}, got {value!r}")
        if not 0 <= kernel < 1 or not 0 <= softness < 1:
            raise ValueError("kernel and softness are fractions of the image side, in [0, 1)")
        self.polarity, self.channel, self.component = polarity, channel, component
        self.kernel, self.softness = float(kernel), float(softness)

    def compute(self, images: np.ndarray) -> dict[str, np.ndarray]:
        foreground = np.stack([self.segment(image) for image in images]).astype(np.float32)
        importance = np.stack([self.soften(mask) for mask in foreground])
        return {IMPORTANCE: importance, FOREGROUND: foreground}

    def segment(self, image: np.ndarray) -> np.ndarray:
        """``[H, W, 3]`` uint8 RGB → ``[H, W]`` uint8 binary (1 = lesion)."""
        import cv2

        height, width = image.shape[:2]
        side = min(height, width)
        if self.channel == "gray":
            plane = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
        else:
            plane = np.ascontiguousarray(image[..., CHANNELS.index(self.channel) - 1])
        plane = cv2.GaussianBlur(plane, (0, 0), sigmaX=max(0.5, 0.02 * side))
        _, bright = cv2.threshold(plane, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        mask = self._orient(bright, height, width)
        if self.kernel > 0:
            size = _odd(self.kernel * side)
            element = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
            mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, element)
            mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, element)
        if self.component != "all":
            mask = self._one_component(mask)
        return self._fill_holes(mask)

    def _orient(self, bright: np.ndarray, height: int, width: int) -> np.ndarray:
        """The side of the threshold that is the lesion: dark, bright, or (auto) the one whose
        pixels lie closer to the centre on average."""
        dark = (1 - bright).astype(np.uint8)
        if self.polarity == "dark":
            return dark
        if self.polarity == "bright":
            return bright.astype(np.uint8)
        rows, cols = np.mgrid[0:height, 0:width]
        distance = np.hypot((rows + 0.5) / height - 0.5, (cols + 0.5) / width - 0.5)

        def spread(mask: np.ndarray) -> float:
            return float(distance[mask > 0].mean()) if mask.any() else np.inf

        return dark if spread(dark) <= spread(bright) else bright.astype(np.uint8)

    def _one_component(self, mask: np.ndarray) -> np.ndarray:
        import cv2

        count, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
        if count <= 1:
            return mask
        height, width = mask.shape
        areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
        if self.component == "central":
            offsets = centroids[1:] / np.array([width, height]) - 0.5
            areas = areas * np.exp(-(offsets**2).sum(axis=1) / (2 * 0.25**2))
        return (labels == 1 + int(np.argmax(areas))).astype(np.uint8)

    @staticmethod
    def _fill_holes(mask: np.ndarray) -> np.ndarray:
        import cv2

        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        filled = np.zeros_like(mask)
        cv2.drawContours(filled, contours, -1, color=1, thickness=cv2.FILLED)
        return filled

    def soften(self, mask: np.ndarray) -> np.ndarray:
        """``[H, W]`` binary → importance: 1 on the mask, a Gaussian fall-off outside it."""
        import cv2

        if self.softness == 0 or not mask.any():
            return mask.astype(np.float32)
        sigma = self.softness * min(mask.shape)
        blurred = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigmaX=sigma)
        return np.maximum(mask, blurred / blurred.max()).astype(np.float32)


@hookimpl
def maskkit_prior_providers() -> list[type[PriorProvider]]:
    return [OtsuPrior]
