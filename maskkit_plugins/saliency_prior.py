"""``saliency``: OpenCV's static saliency (``cv2.saliency``, opencv-contrib).

``spectral_residual`` (Hou & Zhang, CVPR 2007) finds what stands out of the image's log
spectrum; ``fine_grained`` (Montabone & Soto, 2010) uses centre-surround differences. Each map
is scaled to [0, 1] per image (min–max); ``foreground`` is Otsu's threshold of that map.

Both work at a fixed scale in pixels (fine-grained's centre–surround windows, spectral
residual's 64-px spectrum), so images smaller than ``work_size`` are upsampled to it first and
the map is brought back to the image's size: on 28–32 px images fine-grained saliency otherwise
marks the flat background and not the object.
"""

from __future__ import annotations

import numpy as np

from maskkit.hookspecs import hookimpl
from maskkit.priors.provider import FOREGROUND, IMPORTANCE, PriorProvider

METHODS = ("spectral_residual", "fine_grained")


class SaliencyPrior(PriorProvider):
    """OpenCV static saliency, min–max scaled per image; foreground by Otsu on the map."""

    name = "saliency"
    description = "OpenCV static saliency: spectral residual (default) or fine-grained; weight-free."
    provides = frozenset({IMPORTANCE, FOREGROUND})

    def __init__(self, method: str = "spectral_residual", work_size: int = 128) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if int(work_size) < 1:
            raise ValueError(f"work_size must be a positive number of pixels, got {work_size!r}")
        self.method, self.work_size = method, int(work_size)

    def _detector(self):
        import cv2

        if self.method == "spectral_residual":
            return cv2.saliency.StaticSaliencySpectralResidual_create()
        return cv2.saliency.StaticSaliencyFineGrained_create()

    def compute(self, images: np.ndarray) -> dict[str, np.ndarray]:
        import cv2

        detector = self._detector()
        importance, foreground = [], []
        height, width = images.shape[1:3]
        scale = max(1.0, self.work_size / min(height, width))
        work = (round(width * scale), round(height * scale))  # cv2 sizes are (width, height)
        for image in images:
            bgr = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)
            if scale > 1:
                bgr = cv2.resize(bgr, work, interpolation=cv2.INTER_CUBIC)
            ok, saliency = detector.computeSaliency(bgr)
            if not ok:
                raise RuntimeError(f"cv2.saliency ({self.method}) failed on an image")
            saliency = np.asarray(saliency, dtype=np.float32)
            if scale > 1:
                saliency = cv2.resize(saliency, (width, height), interpolation=cv2.INTER_AREA)
            low, high = float(saliency.min()), float(saliency.max())
            scaled = (saliency - low) / (high - low) if high > low else np.zeros_like(saliency)
            _, binary = cv2.threshold(
                np.rint(scaled * 255).astype(np.uint8), 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU
            )
            importance.append(scaled)
            foreground.append(binary.astype(np.float32) if high > low else np.zeros_like(scaled))
        return {IMPORTANCE: np.stack(importance), FOREGROUND: np.stack(foreground)}


@hookimpl
def maskkit_prior_providers() -> list[type[PriorProvider]]:
    return [SaliencyPrior]
