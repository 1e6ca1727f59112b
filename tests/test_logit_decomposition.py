"""``benchmarks/logit_decomposition.py``: the mode's position variety with a mask's shared map
scaled down, on scores whose parts are known."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from logit_decomposition import varieties_by_scale


def test_the_shared_map_scaled_away_leaves_the_image_part():
    generator = torch.Generator().manual_seed(0)
    shared = 10 * torch.randn(1, 64, generator=generator)  # one map for every image, dominant
    own = torch.randn(256, 64, generator=generator)  # each image's part, independent
    varieties = varieties_by_scale(shared + own, 0.75, [1.0, 0.5, 0.0])
    assert varieties[1.0] < 0.3  # the shared map decides the mode: nearly one mask for all
    assert varieties[0.0] > 0.9  # the image part alone: as varied as random masks
    assert varieties[1.0] < varieties[0.5] < varieties[0.0]


def test_scores_without_a_shared_map_are_unchanged_by_the_scale():
    own = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    own = own - own.mean(dim=0, keepdim=True)  # no mean map at all
    varieties = varieties_by_scale(own, 0.75, [1.0, 0.0])
    assert abs(varieties[1.0] - varieties[0.0]) < 1e-9
